"""scripts/compile-docker.sh hands Docker absolute host paths (a fake `docker` on PATH)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile-docker.sh"
FAKE_DOCKER = """#!/usr/bin/env bash
# records each call's arguments, one per line, calls separated by a blank line
printf '%s\\n' "$@" >> "$DOCKER_LOG"
echo >> "$DOCKER_LOG"
"""


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script from tmp_path/work with relative paths; return the `docker run` argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "DOCKER_LOG": str(log)}
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path / "work", env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [c.split("\n") for c in log.read_text().split("\n\n") if c] if log.exists() else []
    runs = [c for c in calls if c[0] == "run"]
    return proc, runs[0] if runs else []


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "work" / "build" / "artifacts").mkdir(parents=True)
    (tmp_path / "work" / "model.tflite").write_bytes(b"tflite")
    return tmp_path / "work"


def test_relative_artifacts_dir_is_mounted_absolute(tmp_path: Path, work: Path) -> None:
    proc, argv = _run(tmp_path, "build/artifacts", "--timeout", "90")
    assert proc.returncode == 0, proc.stderr
    assert f"{work / 'build' / 'artifacts'}:/work" in argv
    assert argv[-4:] == ["compile", "/work", "--timeout", "90"]


@pytest.mark.parametrize("form", [["--out", "compiled"], ["--out=compiled"]])
def test_relative_out_is_mounted_and_rewritten(tmp_path: Path, work: Path,
                                               form: list[str]) -> None:
    proc, argv = _run(tmp_path, "model.tflite", *form, "--segments", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"{work}:/work" in argv and f"{work / 'compiled'}:/out" in argv
    assert argv[-6:] == ["compile", "/work/model.tflite", "--out", "/out", "--segments", "2"]
    assert (work / "compiled").is_dir()


def test_out_equal_to_the_artifacts_dir_maps_to_work(tmp_path: Path, work: Path) -> None:
    proc, argv = _run(tmp_path, "build/artifacts", "--out", "./build/artifacts")
    assert proc.returncode == 0, proc.stderr
    assert argv[-4:] == ["compile", "/work", "--out", "/work"]
    assert not any(a.endswith(":/out") for a in argv)


def test_missing_target_is_a_one_line_error(tmp_path: Path, work: Path) -> None:
    proc, argv = _run(tmp_path, "nope")
    assert proc.returncode == 1 and argv == []
    assert proc.stderr.strip() == "compile-docker: nope: no such file or directory"
