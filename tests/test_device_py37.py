"""The device side must stay valid Python 3.7: the Coral Dev Board's Mendel ships 3.7."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python37() -> str:
    candidates = sorted(Path.home().glob(".pyenv/versions/3.7*/bin/python3.7"))
    candidates += [Path(p) for p in [shutil.which("python3.7")] if p]
    for candidate in candidates:
        probe = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and "(3, 7)" in probe.stdout:
            return str(candidate)
    pytest.skip("no Python 3.7 interpreter on this machine")


def test_device_and_core_modules_compile_under_python37(tmp_path):
    files = sorted(str(p) for d in ("device", "gemma_edge") for p in (ROOT / d).glob("*.py"))
    script = ("import py_compile, sys\n"
              "for f in sys.argv[1:]:\n"
              "    py_compile.compile(f, cfile=sys.argv[0] + '.pyc', doraise=True)\n")
    runner = tmp_path / "check.py"
    runner.write_text(script)
    done = subprocess.run([_python37(), str(runner), *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
