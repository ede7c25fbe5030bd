"""Device-side helpers: the token table, releasing mapped file pages, default threads."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from gemma_edge.device import runtime
from gemma_edge.device import table as table_module
from gemma_edge.device.runtime import default_threads, release_file_pages
from gemma_edge.device.table import EmbeddingTable, quantize_rows_int8
from gemma_edge.errors import ArtifactError


def _write_table(tmp_path, rows, version=None):
    q, scales = quantize_rows_int8(rows)
    for name, array in (("t.npy", q), ("s.npy", scales)):
        with open(tmp_path / name, "wb") as f:
            np.lib.format.write_array(f, array, version=version)
    return {"path": "t.npy", "scales": "s.npy"}


@pytest.mark.parametrize("pread", [True, False])
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_lookup_is_exact_and_maps_nothing(tmp_path, monkeypatch, version, pread,
                                          resident_kib):
    """Rows come back exact, repeated ids too; with os.pread no page of the table is
    resident in the process (large page-cache folios made a mapped lookup of a few rows
    cost MBs); without it (Windows) the mapped fallback gives the same rows."""
    if not pread:
        monkeypatch.delattr(table_module.os, "pread", raising=False)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, 24)).astype(np.float32)
    table = EmbeddingTable(tmp_path, _write_table(tmp_path, rows, version))
    q, scales = quantize_rows_int8(rows)
    for ids in ([5, 0, 299, 5], [7], []):
        expected = (q[ids] * scales[ids, None]).reshape(len(ids), 24)
        np.testing.assert_array_equal(table.lookup(ids), expected)
    if pread and sys.platform.startswith("linux"):
        assert resident_kib(tmp_path / "t.npy") == 0
    assert (table.vocab_size, table.dim) == (300, 24)
    with pytest.raises(ArtifactError, match="outside the table"):
        table.lookup([300])


def test_unreadable_table_is_explained(tmp_path):
    (tmp_path / "t.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ArtifactError, match="t.npy: cannot read"):
        EmbeddingTable(tmp_path, {"path": "t.npy"})


def test_truncated_table_is_explained(tmp_path):
    spec = _write_table(tmp_path, np.ones((50, 8), dtype=np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-100])
    with pytest.raises(ArtifactError, match="t.npy: cannot read.*truncated"):
        EmbeddingTable(tmp_path, spec)


@pytest.mark.skipif(not hasattr(table_module.os, "pread"), reason="the pread path")
def test_table_cut_short_after_open_is_explained(tmp_path):
    spec = _write_table(tmp_path, np.ones((50, 8), dtype=np.float32))
    table = EmbeddingTable(tmp_path, spec)
    size = (tmp_path / "t.npy").stat().st_size
    with open(tmp_path / "t.npy", "r+b") as f:
        f.truncate(size - 8 * 10)  # the last ten rows
    table.lookup([0, 39])
    with pytest.raises(ArtifactError, match="t.npy: short read"):
        table.lookup([45])


def test_scales_of_another_table_are_refused(tmp_path):
    spec = _write_table(tmp_path, np.ones((50, 8), dtype=np.float32))
    np.save(tmp_path / "s.npy", np.ones(49, dtype=np.float32))
    with pytest.raises(ArtifactError, match=r"s.npy: \(49,\) scales for 50 rows"):
        EmbeddingTable(tmp_path, spec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_release_file_pages_drops_resident_pages(tmp_path, resident_kib):
    path = tmp_path / "graph.bin"
    path.write_bytes(np.arange(2 << 20, dtype=np.uint8).tobytes())  # 2 MiB
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8)
    checksum = int(data.sum())  # touch every page
    assert resident_kib(path) >= 2000
    assert release_file_pages(path) >= 2 << 20
    assert resident_kib(path) == 0
    assert int(data.sum()) == checksum  # contents come back from the page cache
    assert release_file_pages(tmp_path / "not-mapped.bin") == 0
    del data
    mapped.close()


def test_release_file_pages_leaves_writable_mappings(tmp_path):
    """A private writable mapping's changed pages would be lost to DONTNEED: not touched."""
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(1 << 20))
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    mapped[:4] = b"edit"
    assert release_file_pages(path) == 0
    assert mapped[:4] == b"edit"
    mapped.close()


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (8, 4)])
def test_default_threads_uses_the_cores_up_to_four(monkeypatch, cores, expected):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    assert default_threads() == expected
