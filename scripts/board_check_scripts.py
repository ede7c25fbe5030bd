"""The board scripts' hardware-free parts, run against the emulated arm64 userland.

The scripts themselves run in this machine's bash (bash behaves the same on any CPU);
every program in them whose answer depends on the board (``python3``, ``gemma-edge``,
``uname``) is the userland's arm64 build, through the wrappers board_check.py puts
first on PATH. So the runtime choice, the Python checks and the embed run are the
board's, and the messages checked here are the ones a board user reads. Nothing here
needs root, a network, a Coral device or ssh: the deploy copies to a local folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

SCRIPTS = Path(__file__).resolve().parent
Result = tuple[str, bool, str]
TIMEOUT = 600


def sh(script: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPTS / script), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd),
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{script}: timed out after {TIMEOUT} s")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def check_board_scripts(bin_dir: Path, env: dict[str, str], art: Path, work: Path,
                        wheel: Path, tpu_art: Path) -> Iterator[Result]:
    """(check name, passed, what it printed) for each hardware-free step of the board scripts."""
    home = Path(env["HOME"])
    home.mkdir(parents=True, exist_ok=True)
    cwd = home

    out = sh("setup-usb-accelerator.sh", "--runtime", "tflite", env=env, cwd=cwd)
    yield ("setup-usb-accelerator.sh rejects a bad --runtime",
           out.returncode == 1 and "--runtime tflite: choose auto, tflite-runtime" in out.stderr,
           last_line(out.stderr))

    # The runtime and PEP 668 checks ask the arm64 Python: auto must pick ai-edge-litert
    # (64-bit, Python >= 3.9) and a venv (Debian 12's Python refuses pip --user).
    out = sh("setup-usb-accelerator.sh", "--dry-run", "--project", str(wheel), env=env, cwd=cwd)
    venv = home / "gemma-edge-venv"
    yield ("setup-usb-accelerator.sh --dry-run picks the aarch64 runtime and a venv",
           out.returncode == 0 and f"{venv}/bin/python -m pip install numpy ai-edge-litert" in out.stdout
           and "refuses pip --user (PEP 668)" in out.stdout,
           next((ln for ln in out.stdout.splitlines() if "pip install numpy" in ln),
                last_line(out.stderr)))

    out = sh("setup-usb-accelerator.sh", "--dry-run", "--runtime", "tflite-runtime", env=env, cwd=cwd)
    yield ("setup-usb-accelerator.sh --runtime tflite-runtime keeps numpy<2",
           out.returncode == 0 and "-m pip install numpy<2 tflite-runtime" in out.stdout,
           next((ln for ln in out.stdout.splitlines() if "-m pip install numpy" in ln),
                last_line(out.stderr)))

    out = sh("setup-devboard.sh", "--dry-run", env=env, cwd=cwd)
    yield ("setup-devboard.sh stops outside Mendel Linux",
           out.returncode == 1 and "this is not Mendel Linux" in out.stderr
           and "setup-usb-accelerator.sh" in out.stderr, last_line(out.stderr))

    dest = home / "gemma-edge" / art.name
    out = sh("deploy-to-board.sh", "--method", "local", str(art), "pi@raspberrypi", env=env, cwd=cwd)
    yield ("deploy-to-board.sh --method local refuses a host",
           out.returncode == 1 and "--method local copies on this machine" in out.stderr,
           last_line(out.stderr))
    out = sh("deploy-to-board.sh", "--method", "local", str(art), env=env, cwd=cwd)
    yield ("deploy-to-board.sh --method local copies and verifies",
           out.returncode == 0 and "sizes match on the board" in out.stdout
           and (dest / "manifest.json").is_file(), last_line(out.stdout + out.stderr))

    # run-on-board.sh on the deployed folder: no Edge TPU visible -> CPU. --no-bench: its
    # benchmark is hundreds of timed runs, a quarter of an hour under emulation, and
    # emulated timings mean nothing.
    result = home / "run-cpu.json"
    env_run = dict(env, GEMMA_EDGE=str(bin_dir / "gemma-edge"),
                   GEMMA_EDGE_APEX_DEVICE=str(home / "no-apex"))
    # The script's default CPU precision (auto: the int8 graph), as a board user runs it;
    # until issue 24's fix tflite-runtime computed that graph as zeros and this ran float.
    out = sh("run-on-board.sh", "--no-bench", str(dest), str(result), env=env_run, cwd=cwd)
    yield ("run-on-board.sh --no-bench embeds on the CPU",
           out.returncode == 0 and "no Edge TPU visible: CPU only" in out.stderr
           and "on cpu" in out.stderr and _json_ok(result), _embed_line(out.stderr))

    # Forced onto the Edge TPU without one: gemma-edge's error, then the CPU retry.
    tpu_dest = home / "gemma-edge" / "with-compiled"
    # a fresh folder: the name is the same at every run, and a previous run's files (an
    # export with other segment names) would stay beside the new ones, so the deploy's
    # size check would rightly fail
    shutil.rmtree(tpu_dest, ignore_errors=True)
    copy = sh("deploy-to-board.sh", "--method", "local", "--dest", str(tpu_dest), str(tpu_art),
              env=env, cwd=cwd)
    result = home / "run-edgetpu.json"
    out = sh("run-on-board.sh", "--no-bench", "--backend", "edgetpu", str(tpu_dest), str(result),
             env=env_run, cwd=cwd)
    yield ("run-on-board.sh --backend edgetpu without a device falls back to the CPU",
           copy.returncode == 0 and out.returncode == 0
           and "error: no Edge TPU available" in out.stderr
           and "embedding on the Edge TPU failed (see above): retrying on the CPU" in out.stderr
           and _json_ok(result),
           next((ln[:160] for ln in out.stderr.splitlines() if "no Edge TPU" in ln),
                last_line(out.stderr)))


def _json_ok(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _embed_line(stderr: str) -> str:
    """Which backend the embed ran on; its emulated seconds are left out (not a latency)."""
    line = next((ln for ln in stderr.splitlines() if "embed: 4 texts" in ln), "")
    return f"embedded 4 texts on {line.split()[-1]}" if line else last_line(stderr)
