"""Write a command's report as JSON and, when asked, as a PNG chart (bench, eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .manifest import atomic_write_json


def save_report(report: dict[str, Any], json_path: Optional[Path], plot_path: Optional[Path],
                plot: Callable[[dict[str, Any], Path], None]) -> None:
    if json_path:
        atomic_write_json(json_path, report)
        print(f"wrote {json_path}")
    if plot_path:
        plot(report, plot_path)
        print(f"wrote {plot_path}")
