"""Shared fixtures: a tiny random EmbeddingGemma checkpoint and its exported artifacts.

Built once per test session in a temp folder (about 20 s on 2 cores); no test
needs the real 1.2 GB checkpoint or the network. Tests that convert TFLite graphs are
marked ``slow`` (explicitly, or here by using the tiny export): ``make test-fast`` (pytest
-m "not slow") leaves them out, ``make test`` runs everything.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# XNNPACK weight caches of the test graphs go to a throw-away folder, not ~/.cache,
# removed when the session ends.
os.environ["GEMMA_EDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemma-edge-test-cache-")
atexit.register(shutil.rmtree, os.environ["GEMMA_EDGE_CACHE_DIR"], ignore_errors=True)

TINY_BUCKETS = (16, 32, 64)
# Fixtures whose set-up converts graphs (the tiny model's export, directly or through
# another fixture): a test that uses one is slow whatever it does itself.
CONVERTING_FIXTURES = frozenset({"tiny_artifacts"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test whose fixtures (transitively) include a converting one."""
    for item in items:
        if CONVERTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma_edge.export.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full export (float + int8 graphs) of the tiny checkpoint, buckets 16/32/64, 4 pooling slots."""
    from gemma_edge.export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("art") / "tiny-art"
    run_export(str(tiny_checkpoint), out,
               ExportOptions(buckets=TINY_BUCKETS, pool_slots=4, edgetpu_buckets=(32,)))
    return out

# The bucket the segment tests (tests/test_segments.py, tests/research/) calibrate.
SEGMENT_TEST_BUCKET = 32


@pytest.fixture(scope="module")
def tiny_core(tiny_checkpoint: Path):
    """The tiny checkpoint's export encoder (torch)."""
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    core, _ = build_encoder(load_checkpoint(tiny_checkpoint))
    return core


@pytest.fixture(scope="module")
def calibration(tiny_artifacts: Path):
    """Corpus calibration samples of the tiny export, six for SEGMENT_TEST_BUCKET."""
    from gemma_edge.export.calibration import calibration_set

    return calibration_set(tiny_artifacts, [SEGMENT_TEST_BUCKET], 6)



def _resident_kib(path: Path) -> int:
    """This process's resident KiB of mappings of ``path`` (/proc/self/smaps; Linux)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = line.split()[-1] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.fixture
def resident_kib():
    """``resident_kib(path)``: how much of a file this test process holds resident."""
    return _resident_kib
