"""Write a command's report as JSON and, when asked, as a PNG chart (bench, eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .atomic_files import atomic_write_json


def save_report(report: dict[str, Any], json_path: Optional[Path], plot_path: Optional[Path],
                plot: Callable[[dict[str, Any], Path], None]) -> None:
    if json_path:
        atomic_write_json(json_path, report)
        print(f"wrote {json_path}")
    if plot_path:
        plot(report, plot_path)
        print(f"wrote {plot_path}")


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically, then closed."""
    import io

    import matplotlib.pyplot as plt

    from .atomic_files import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
