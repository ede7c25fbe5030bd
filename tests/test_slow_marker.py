"""The `slow` marker selects the tests that convert graphs, so `make test-fast`
(pytest -m "not slow") is the edit loop and `make test` still runs everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collected(*args: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return {line.split("[")[0] for line in out.stdout.splitlines() if "::" in line}


def test_not_slow_leaves_out_the_converting_tests_and_keeps_the_others():
    files = ["tests/test_segments.py", "tests/research/test_ranges.py"]
    everything = _collected(*files)
    fast = _collected("-m", "not slow", *files)
    # marked by the tiny export it uses (conftest) and explicitly
    assert "tests/test_segments.py::test_segmented_rewrite_is_exact_in_float" in everything
    assert "tests/test_segments.py::test_segmented_rewrite_is_exact_in_float" not in fast
    assert ("tests/research/test_ranges.py::test_range_statistics_of_the_calibration"
            not in fast)
    # a test that converts nothing stays in the fast set
    assert ("tests/research/test_ranges.py::"
            "test_mse_range_clips_a_lone_outlier_and_keeps_a_dense_range") in fast
    assert fast < everything
