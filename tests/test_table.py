"""Device-side helpers: the token table, releasing mapped file pages, default threads."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from gemma_edge.device import runtime
from gemma_edge.device.runtime import default_threads, release_file_pages
from gemma_edge.device.table import EmbeddingTable, quantize_rows_int8
from gemma_edge.errors import ArtifactError


def _write_table(tmp_path, rows, version=None):
    q, scales = quantize_rows_int8(rows)
    for name, array in (("t.npy", q), ("s.npy", scales)):
        with open(tmp_path / name, "wb") as f:
            np.lib.format.write_array(f, array, version=version)
    return {"path": "t.npy", "scales": "s.npy"}


@pytest.mark.parametrize("version", [None, (2, 0)])
def test_lookup_is_exact_and_survives_release(tmp_path, version):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, 24)).astype(np.float32)
    table = EmbeddingTable(tmp_path, _write_table(tmp_path, rows, version))
    q, scales = quantize_rows_int8(rows)
    ids = [5, 0, 299, 5]
    for _ in range(2):  # the second lookup reads pages released after the first
        np.testing.assert_array_equal(table.lookup(ids), q[ids] * scales[ids, None])
        if sys.platform.startswith("linux") and hasattr(mmap.mmap, "madvise"):
            assert _resident_kib(tmp_path / "t.npy") == 0  # released after the lookup
    assert (table.vocab_size, table.dim) == (300, 24)
    with pytest.raises(ArtifactError, match="outside the table"):
        table.lookup([300])


def test_unreadable_table_is_explained(tmp_path):
    (tmp_path / "t.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ArtifactError, match="t.npy: cannot map"):
        EmbeddingTable(tmp_path, {"path": "t.npy"})


def _resident_kib(path) -> int:
    total, inside = 0, False
    for line in open("/proc/self/smaps", encoding="utf-8"):
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_release_file_pages_drops_resident_pages(tmp_path):
    path = tmp_path / "graph.bin"
    path.write_bytes(np.arange(2 << 20, dtype=np.uint8).tobytes())  # 2 MiB
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8)
    checksum = int(data.sum())  # touch every page
    assert _resident_kib(path) >= 2000
    assert release_file_pages(path) >= 2 << 20
    assert _resident_kib(path) == 0
    assert int(data.sum()) == checksum  # contents come back from the page cache
    assert release_file_pages(tmp_path / "not-mapped.bin") == 0
    del data
    mapped.close()


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (8, 4)])
def test_default_threads_uses_the_cores_up_to_four(monkeypatch, cores, expected):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    assert default_threads() == expected
