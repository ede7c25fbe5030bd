"""Write a command's report as JSON and, when asked, as a PNG chart (bench, eval)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from .atomic_files import atomic_write_json
from .errors import InputError


def check_output_file(path: Optional[Path], flag: str, suffix: Optional[str] = None) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, a
    wrong suffix, or a path whose nearest existing parent is not a writable folder (a
    benchmark or an evaluation must not run for minutes and then fail to save)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; pass a file path"
                         + (f" ending in {suffix}" if suffix else ""))
    if suffix and path.suffix.lower() != suffix:
        raise InputError(f"{flag} {path}: the file name must end in {suffix}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise InputError(f"{flag} {path}: cannot write there ({parent} is not a writable "
                         f"folder); pass another {flag}")


def check_report_paths(json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """``check_output_file`` for a command's --json and --plot."""
    check_output_file(json_path, "--json")
    check_output_file(plot_path, "--plot", ".png")


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
