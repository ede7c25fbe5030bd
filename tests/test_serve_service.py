"""The board's systemd unit for `gemma-edge serve` and the script that installs it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
INSTALL = SCRIPTS / "install-serve-service.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture()
def art(tmp_path: Path) -> Path:
    folder = tmp_path / "gemma edge art".replace(" ", "-")
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1}))
    return folder


@pytest.fixture()
def fake_gemma_edge(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "gemma-edge"
    exe.parent.mkdir()
    exe.write_text("#!/usr/bin/python3\nprint('fake')\n")
    exe.chmod(0o755)
    return exe


def test_dry_run_fills_in_the_unit(art: Path, fake_gemma_edge: Path) -> None:
    out = run("--dry-run", "--port", "9001", "--host", "0.0.0.0", "--gemma-edge",
              str(fake_gemma_edge), str(art))
    assert out.returncode == 0, out.stderr
    assert f"ExecStart={fake_gemma_edge} serve {art} --host ${{GEMMA_EDGE_HOST}}" in out.stdout
    assert "GEMMA_EDGE_HOST=0.0.0.0\nGEMMA_EDGE_PORT=9001" in out.stdout
    assert "@" not in out.stdout.replace("@...@", "")  # every placeholder filled in
    assert "WantedBy=multi-user.target" in out.stdout and "KillSignal=SIGTERM" in out.stdout


@pytest.mark.parametrize("args, words", [
    (["--port", "99999"], "--port 99999: not a TCP port"),
    (["--gemma-edge", "/nonexistent/gemma-edge"], "no gemma-edge executable"),
    (["--frobnicate"], "unknown option: --frobnicate"),
])
def test_bad_arguments(art: Path, args: list, words: str) -> None:
    out = run("--dry-run", *args, str(art))
    assert out.returncode != 0 and words in out.stderr


def test_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    out = run("--dry-run", str(tmp_path))
    assert out.returncode == 1 and "manifest.json missing" in out.stderr
    assert run("--help").returncode == 0 and "Usage:" in run("--help").stdout


def test_unit_passes_systemd_analyze(art: Path, fake_gemma_edge: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    out = run("--dry-run", "--gemma-edge", str(fake_gemma_edge), str(art))
    unit = tmp_path / "gemma-edge-serve.service"
    unit.write_text(out.stdout.split("install-serve-service: would write")[0])
    check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert check.returncode == 0 and "gemma-edge-serve.service" not in check.stderr, check.stderr
