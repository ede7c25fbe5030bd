"""--json / --plot / --output paths are checked before any work (a bench or an evaluation
must not run for minutes and then fail to save, nor leave a temp file beside the target)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_edge.errors import InputError
from gemma_edge.reporting import check_output_file, check_report_paths


def test_good_paths_pass(tmp_path: Path) -> None:
    check_report_paths(tmp_path / "new" / "report.json", tmp_path / "plot.png")
    check_report_paths(None, None)
    check_output_file(tmp_path / "x.npy", "--output", ".npy")


@pytest.mark.parametrize("flag, name, message", [
    ("--json", "folder", "is a directory; pass a file path"),
    ("--plot", "folder", "is a directory; pass a file path ending in .png"),
    ("--plot", "chart.jpg", "the file name must end in .png"),
    ("--json", "a-file/report.json", "is not a writable folder"),
])
def test_bad_paths_are_refused(tmp_path: Path, flag: str, name: str, message: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / name
    with pytest.raises(InputError, match=message) as info:
        check_report_paths(path if flag == "--json" else None, path if flag == "--plot" else None)
    assert str(info.value).startswith(f"{flag} {path}")


@pytest.mark.parametrize("command", [
    ["bench", "--artifacts", "{missing}", "--plot", "{dir}"],
    ["serve-bench", "{missing}", "--plot", "{dir}"],
    ["eval", "--artifacts", "{missing}", "--checkpoint", "{missing}", "--json", "{dir}"],
])
def test_commands_refuse_a_folder_before_any_work(tmp_path: Path, capsys, command) -> None:
    if command[0] == "serve-bench":
        pytest.importorskip("uvicorn")
    from gemma_edge.cli import main

    args = [a.format(missing=tmp_path / "no-artifacts", dir=tmp_path) for a in command]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert "is a directory; pass a file path" in err  # not "no manifest.json": checked first
    assert not list(tmp_path.glob(".*.tmp"))
