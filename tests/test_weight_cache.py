"""CPU graphs through LiteRT's CompiledModel with XNNPACK's weight cache (device/weight_cache.py).

Same vectors as the Interpreter path, one cache file per graph content, reused by the
next process, rebuilt when damaged, never left half-written; off when not writable.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from gemma_edge.device import Embedder
from gemma_edge.device.runtime import GraphRunner
from gemma_edge.device.weight_cache import WeightCachedRunner, compiled_model_api

pytestmark = pytest.mark.skipif(compiled_model_api() is None,
                                reason="this LiteRT runtime has no CompiledModel API")

QUERIES = ["hello", "a much longer query about embedded retrieval on small boards"]
DOCS = ["word " * 40, "short doc", "x " * 20]


def _vectors(emb: Embedder) -> np.ndarray:
    return np.concatenate([emb.encode_query(QUERIES), emb.encode_document(DOCS)])


@pytest.mark.parametrize("precision", ["int8", "float"])
def test_same_vectors_as_interpreter_and_cache_reused(tiny_artifacts, tmp_path, precision):
    cache = tmp_path / "wc"
    reference = _vectors(Embedder(tiny_artifacts, backend="cpu", precision=precision,
                                  weight_cache=False))
    emb = Embedder(tiny_artifacts, backend="cpu", precision=precision, weight_cache=cache)
    got = _vectors(emb)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert emb.graphs.runners and all(isinstance(r, WeightCachedRunner)
                               for r in emb.graphs.runners.values())
    files = sorted(cache.glob("*.xnnpack"))
    opened = {emb.graphs.file_of(s) for s in emb.graphs.runners}
    assert len(files) == len(opened)  # one per graph file (the float export is one file)
    assert all(f.suffix == ".xnnpack" and f.stat().st_size > 0 for f in files)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = _vectors(Embedder(tiny_artifacts, backend="cpu", precision=precision,
                              weight_cache=cache))
    np.testing.assert_allclose(again, reference, atol=1e-6)
    assert {f: f.stat().st_mtime_ns for f in cache.glob("*.xnnpack")} == stamps  # mapped, not re-packed


def test_damaged_cache_is_rebuilt(tiny_artifacts, tmp_path):
    cache = tmp_path / "wc"
    reference = Embedder(tiny_artifacts, backend="cpu", precision="int8",
                         weight_cache=cache).encode_query(QUERIES)
    for f in cache.glob("*.xnnpack"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    got = Embedder(tiny_artifacts, backend="cpu", precision="int8",
                   weight_cache=cache).encode_query(QUERIES)
    np.testing.assert_allclose(got, reference, atol=1e-6)


def test_cache_name_follows_graph_content(tiny_artifacts, tmp_path):
    """A cache packed from other weights is never used: the name is the graph's SHA-256."""
    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", weight_cache=tmp_path)
    emb.encode_query(["hello"])
    path = emb.graphs.file_of(16)
    sha = emb.manifest["files"][path]["sha256"]
    assert [f.name for f in tmp_path.glob("*.xnnpack")] == [emb.graphs.weight_cache.cache_path(sha).name]
    assert sha[:32] in emb.graphs.weight_cache.cache_path(sha).name


def test_failed_open_leaves_no_partial_cache(tiny_artifacts, tmp_path, monkeypatch):
    from gemma_edge.errors import ArtifactError

    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", weight_cache=tmp_path)
    real = emb.graphs.weight_cache.api["CompiledModel"]

    class Failing:
        @staticmethod
        def from_file(path, environment, options):
            open(options.cpu_options.xnnpack_weight_cache_path, "wb").write(b"partial")
            raise RuntimeError("simulated failure while packing")

    monkeypatch.setitem(emb.graphs.weight_cache.api, "CompiledModel", Failing)
    with pytest.raises(ArtifactError, match="cannot load it"):
        emb.encode_query(["hello"])
    assert list(tmp_path.glob("*.xnnpack*")) == []
    monkeypatch.setitem(emb.graphs.weight_cache.api, "CompiledModel", real)
    assert emb.encode_query(["hello"]).shape == (1, emb.output_dim)


def test_unwritable_cache_falls_back_to_interpreter(tiny_artifacts, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="gemma_edge.device"):
        emb = Embedder(tiny_artifacts, backend="cpu", precision="int8",
                       weight_cache=blocker / "cache")
    assert "not writable" in caplog.text
    emb.encode_query(["hello"])
    assert all(isinstance(r, GraphRunner) for r in emb.graphs.runners.values())


def test_default_cache_dir_from_environment(tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_EDGE_CACHE_DIR", str(tmp_path / "env-cache"))
    Embedder(tiny_artifacts, backend="cpu", precision="int8").encode_query(["hello"])
    assert len(list((tmp_path / "env-cache").glob("*.xnnpack"))) == 1


def test_broken_compiled_runtime_falls_back_to_interpreter(tiny_artifacts, tmp_path,
                                                           monkeypatch, caplog):
    from gemma_edge.device import weight_cache

    def broken(*args, **kwargs):
        raise RuntimeError("no environment")

    monkeypatch.setattr(weight_cache.WeightCachedGraphs, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="gemma_edge.device"):
        emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", weight_cache=tmp_path)
    assert "CompiledModel unavailable" in caplog.text and emb.graphs.weight_cache is None
    assert emb.encode_query(["hello"]).shape == (1, emb.output_dim)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_graph_file_pages_released_after_open(tiny_artifacts, tmp_path, resident_kib):
    """The graph file's pages LiteRT reads at open leave the process (the packed weights
    come from the cache file), whether the cache is packed now or mapped; runs read back
    only the constants XNNPACK does not pack; the vectors are unchanged."""
    reference = Embedder(tiny_artifacts, backend="cpu", precision="int8",
                         weight_cache=False).encode_query(QUERIES)
    for _ in range(2):  # the first Embedder packs the cache file, the second maps it
        emb = Embedder(tiny_artifacts, backend="cpu", precision="int8",
                       weight_cache=tmp_path / "wc")
        runner = emb.runner(emb.buckets[0])  # opens the file, no run yet
        graph_file = (tiny_artifacts / emb.graphs.file_of(emb.buckets[0])).resolve()
        assert isinstance(runner, WeightCachedRunner) and resident_kib(graph_file) == 0
        for _ in range(2):
            np.testing.assert_allclose(emb.encode_query(QUERIES), reference, atol=1e-6)
        assert resident_kib(graph_file) < graph_file.stat().st_size / 1024 / 2


def test_plugin_search_path_is_an_empty_folder_not_the_cache(tiny_artifacts, tmp_path, monkeypatch):
    """LiteRT walks its plugin paths recursively at every open: pointed at the cache dir,
    whatever else lives there (a board userland under ~/.cache/gemma-edge) made the first
    open take minutes. They must name an empty folder of the project's own."""
    from gemma_edge.device import weight_cache

    seen: dict = {}
    api = dict(compiled_model_api())
    real_options = api["EnvironmentOptions"]

    def recording_options(**kwargs):
        seen.update(kwargs)
        return real_options(**kwargs)

    api["EnvironmentOptions"] = recording_options
    cache = tmp_path / "wc"
    (cache / "unrelated" / "deep").mkdir(parents=True)
    weight_cache.WeightCachedGraphs(api, cache, num_threads=1)
    for key in ("compiler_plugin_path", "dispatch_library_path"):
        path = os.path.realpath(seen[key])
        assert path != os.path.realpath(cache)
        assert os.path.isdir(path) and not os.listdir(path)
