"""Float export of the tiny model: artifacts, manifest, and the device path vs sentence-transformers."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from gemma_edge.atomic_files import sha256_file
from gemma_edge.device import Embedder
from gemma_edge.errors import ArtifactError, InputError, VerificationError
from gemma_edge.manifest import find_graph, load_manifest


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_checkpoint), device="cpu")
    model.max_seq_length = 64
    return model


@pytest.fixture(scope="module")
def embedder(tiny_artifacts):
    return Embedder(tiny_artifacts, backend="cpu", precision="float")


def test_manifest_describes_everything(tiny_artifacts):
    m = load_manifest(tiny_artifacts, verify_hashes=True)
    assert m["buckets"] == [16, 32, 64]
    graph = find_graph(m, "float", 32)
    assert graph and graph["seq_lens"] == [16, 32, 64]
    assert set(graph["signatures"]) == {"16", "32", "64"}
    io = graph["io"]["encode_32"]
    assert [i["shape"] for i in sorted(io["inputs"], key=lambda r: r["name"])] == [
        [1, 32, 96], [1, 32, 32], [1, 4, 32]]
    assert io["outputs"][0]["shape"] == [1, 4, 256]
    for name, info in m["files"].items():
        assert sha256_file(tiny_artifacts / name) == info["sha256"]
    assert m["verification"]["float"]["min_cosine"] >= 0.9999
    assert m["model"]["mrl_dims"] == [256, 128]
    assert m["source"]["weights_sha256"]


@pytest.mark.parametrize("dim", [None, 128])
def test_embedder_matches_sentence_transformers(embedder, reference, dim):
    texts = ["hello world", "Die Katze schläft.", "", "fox " * 40, "素早い茶色の狐"]
    ours = embedder.encode_query(texts, dim=dim)
    ref = reference.encode(texts, prompt_name="query", normalize_embeddings=True,
                           truncate_dim=dim)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    assert ours.dtype == np.float32 and ours.shape == (5, dim or 256)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (np.sum(ours * ref, axis=1) >= 0.99999).all()


def test_documents_with_titles(embedder, reference):
    ours = embedder.encode_document(["a manual page"], title="Router")
    ref = reference.encode(["title: Router | text: a manual page"], normalize_embeddings=True)
    assert float(ours[0] @ ref[0]) >= 0.99999
    none = embedder.encode_document(["a manual page"])
    ref_none = reference.encode(["a manual page"], prompt_name="document")
    assert float(none[0] @ ref_none[0]) >= 0.99999


def test_packing_equals_one_by_one(embedder):
    texts = ["one", "two words", "three little words", "a longer sentence about foxes"]
    assert len(embedder.plan([len(t) for t in embedder.tokenizer.encode(texts, 64)[0]])) == 1
    batch = embedder.encode_query(texts)
    single = np.stack([embedder.encode_query([t])[0] for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_long_texts_carry_short_ones_in_their_free_tokens(tiny_artifacts, embedder):
    emb = Embedder(tiny_artifacts, backend="cpu", precision="float", pack_tokens=16)
    texts = ["a longer sentence about foxes and the lazy dog that sleeps", "one", "two words",
             "three little words here", "b"]
    lengths = [len(t) for t in emb.tokenizer.encode(texts, 64)[0]]
    assert lengths[0] > 16 and sum(lengths[1:]) <= emb.bucket_for(lengths[0]) - lengths[0]
    runs = emb.plan(lengths)
    # largest first, up to the graph's 4 pooling slots; the rest packed on its own
    assert runs == [(emb.bucket_for(lengths[0]), [0, 3, 2, 1]), (emb.bucket_for(lengths[4]), [4])]
    assert sorted(i for _, members in runs for i in members) == list(range(len(texts)))
    batch = emb.encode_query(texts)
    single = np.stack([embedder.encode_query([t])[0] for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_full_int8_segments_pack_only_into_their_smallest_bucket(tiny_artifacts):
    """Larger segment buckets are less exact: pack into the smallest, carry nothing."""
    emb = Embedder(tiny_artifacts, backend="cpu", precision="full-int8")
    assert emb.buckets == [32] and emb.pack_tokens == 32 and not emb.carry_short
    runs = emb.plan([20, 5, 6, 30])
    assert runs == [(32, [3]), (32, [0, 2, 1])]
    float_emb = Embedder(tiny_artifacts, backend="cpu", precision="float")
    assert float_emb.pack_tokens == 64 and float_emb.carry_short  # 256, capped by the buckets


def test_smallest_bucket_is_chosen(embedder):
    assert embedder.bucket_for(3) == 16 and embedder.bucket_for(17) == 32
    with pytest.raises(InputError):
        embedder.bucket_for(65)


def test_overlong_text_truncates_with_warning(embedder, caplog):
    with caplog.at_level(logging.WARNING, logger="gemma_edge.device"):
        out = embedder.encode_query(["word " * 500])
    assert out.shape == (1, 256)
    assert "truncated" in caplog.text


def test_bad_inputs(embedder):
    assert embedder.encode_query([]).shape == (0, 256)
    with pytest.raises(InputError, match="dim 100"):
        embedder.encode_query(["x"], dim=100)
    with pytest.raises(InputError, match="strings"):
        embedder.encode_query([1, 2])
    with pytest.raises(InputError, match="prompt 'nope'"):
        embedder.encode(["x"], prompt_name="nope")
    with pytest.raises(InputError, match="precision"):
        Embedder(embedder.art_dir, precision="fp16")


def test_missing_role_is_explained(tiny_artifacts, tmp_path):
    other = tmp_path / "float-only"
    shutil.copytree(tiny_artifacts, other)
    m = json.loads((other / "manifest.json").read_text())
    m["graphs"] = [g for g in m["graphs"] if g["role"] == "float"]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="no 'int8' graph"):
        Embedder(other, backend="cpu", precision="int8")


def test_int8_cpu_graphs(tiny_artifacts, embedder):
    m = load_manifest(tiny_artifacts)
    int8 = [g for g in m["graphs"] if g["role"] == "int8"]
    assert sorted(g["seq_lens"][0] for g in int8) == [16, 32, 64]
    assert all(g["census"].get("INT8", 0) > 0 for g in int8)
    assert m["verification"]["int8"]["min_cosine"] >= 0.97
    quant = Embedder(tiny_artifacts, backend="cpu", precision="int8")
    assert quant.graph_role == "int8"
    texts = ["hello world", "a longer sentence about foxes and dogs"]
    cos = np.sum(quant.encode_query(texts) * embedder.encode_query(texts), axis=1)
    assert (cos > 0.97).all() and (cos < 0.999999).all()  # quantised, but close


def test_int8_graphs_have_no_per_channel_hybrid_fully_connected(tiny_artifacts):
    """Issue 24: tflite-runtime 2.14 (the boards' runtime) computes a FULLY_CONNECTED with
    float input and per-channel int8 weights as zeros; the export moves the channel scales
    into a MUL (export/hybrid_fc.py), the weights staying int8. The graphs on tflite-runtime
    itself: `make board-check` (tests/test_hybrid_fc.py has the rewrite's numerics). The
    one-file graph, which only ai-edge-litert's CompiledModel reads, keeps the quantizer's
    per-channel form (no extra MULs on that path)."""
    from gemma_edge.export.hybrid_fc import per_channel_hybrid_fc
    from gemma_edge.export.quantize import tensor_dtype_census

    m = load_manifest(tiny_artifacts)
    graphs = [g for g in m["graphs"] if g["role"] in ("int8", "int8-shared")]
    assert sorted(g["role"] for g in graphs) == ["int8"] * 3 + ["int8-shared"]
    for g in graphs:
        model = (tiny_artifacts / g["path"]).read_bytes()
        fcs = per_channel_hybrid_fc(model)
        assert (fcs == 0) if g["role"] == "int8" else (fcs > 0), (g["path"], fcs)
        assert tensor_dtype_census(model) == g["census"] and g["census"]["INT8"] > 0


def test_every_matmul_runs_in_xnnpack(tiny_artifacts):
    """No FULLY_CONNECTED with run-time weights: XNNPACK leaves those to a slow kernel
    (QK^T written as one 2-D product cost ~100 of 178 ms at 256 tokens)."""
    from gemma_edge.compile.tflite_reader import read_model

    m = load_manifest(tiny_artifacts)
    paths = {g["path"] for g in m["graphs"] if g["role"] in ("float", "int8")}
    for path in paths:
        graph = read_model(tiny_artifacts / path).graphs[0]
        fcs = [op for op in graph.operators if op.op == "FULLY_CONNECTED"]
        assert fcs and all(graph.op_inputs(op)[1].constant for op in fcs), path
        assert sum(op.op == "BATCH_MATMUL" for op in graph.operators) >= 2 * 4  # QK^T, PV per layer


def test_default_precision_is_int8_when_exported(tiny_artifacts, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gemma_edge.device"):
        emb = Embedder(tiny_artifacts, backend="cpu")
    assert (emb.precision, emb.graph_role) == ("int8", "int8")
    assert emb.num_threads >= 1  # not the runtime's single-thread default
    with pytest.raises(InputError, match="num_threads 0: at least 1"):
        Embedder(tiny_artifacts, backend="cpu", num_threads=0)
    assert "int8 graph" in caplog.text
    art = tmp_path / "float-only"
    shutil.copytree(tiny_artifacts, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["graphs"] = [g for g in manifest["graphs"] if g["role"] == "float"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert Embedder(art, backend="cpu").precision == "float"


def test_cpu_runner_releases_graph_file_pages(tiny_artifacts, monkeypatch):
    """Interpreter path (no weight cache, e.g. tflite-runtime): after XNNPACK has packed the
    weights, the mapped file's pages are released once."""
    from gemma_edge.device import runtime

    released = []
    monkeypatch.setattr(runtime, "release_file_pages", lambda path: released.append(path))
    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", pack_tokens=0,
                   weight_cache=False)
    first = emb.encode_query(["hello"])
    emb.encode_query(["hello"])
    assert [p.name for p in released] == ["encoder_int8_16.tflite"]
    np.testing.assert_allclose(first, emb.encode_query(["hello"]), atol=1e-6)


def test_auto_falls_back_to_cpu(tiny_artifacts, caplog):
    with caplog.at_level(logging.INFO, logger="gemma_edge.device"):
        emb = Embedder(tiny_artifacts, backend="auto", precision="float")
    assert emb.backend == "cpu"
    assert "cpu backend" in caplog.text


def test_corrupted_artifacts(tiny_artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, broken)
    graph = broken / "encoder_float.tflite"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        Embedder(broken, backend="cpu")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable JSON"):
        Embedder(broken, backend="cpu")
    with pytest.raises(ArtifactError, match="not a gemma-edge artifacts directory"):
        Embedder(tmp_path, backend="cpu")


def test_wrong_format_version(tiny_artifacts, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_artifacts, other)
    m = json.loads((other / "manifest.json").read_text())
    m["format_version"] = 99
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 99"):
        Embedder(other, backend="cpu")


@pytest.mark.slow
def test_failed_verification_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from gemma_edge.export import pipeline

    def broken(*args, **kwargs):
        raise VerificationError("simulated mismatch")

    monkeypatch.setattr(pipeline, "verify_artifacts", broken)
    out = tmp_path / "art"
    with pytest.raises(VerificationError):
        pipeline.run_export(str(tiny_checkpoint), out,
                            pipeline.ExportOptions(buckets=(16,), pool_slots=2, quantize=False))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_failure_while_segments_build_cancels_them_and_leaves_nothing(tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    """The Edge TPU segments start on worker processes before the float conversion; a
    failure after that stops the workers and removes the staging folder."""
    import multiprocessing

    from gemma_edge.export import pipeline
    from gemma_edge.export.segments import SegmentBuild

    started = []
    enter = SegmentBuild.__enter__

    def recorded(self):
        started.append(self)
        return enter(self)

    def broken(*args, **kwargs):
        assert started, "the segments should be running during the float verification"
        raise VerificationError("simulated mismatch")

    monkeypatch.setattr(SegmentBuild, "__enter__", recorded)
    monkeypatch.setattr(pipeline, "verify_artifacts", broken)
    out = tmp_path / "art"
    with pytest.raises(VerificationError):
        pipeline.run_export(str(tiny_checkpoint), out, pipeline.ExportOptions(
            buckets=(16,), pool_slots=2, edgetpu_buckets=(16,), evaluate=False))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert multiprocessing.active_children() == []  # the worker pool is shut down
    # jobs not yet started were dropped (2 workers ran at most 2-4 of the 2 x layers)
    jobs = [job for seq_jobs in started[0]._jobs.values() for _, _, job in seq_jobs]
    assert jobs and all(job.done() for job in jobs)


def test_per_bucket_int8_files_are_cut_out_of_the_one_file_graph(tiny_artifacts):
    """The per-bucket CPU int8 files hold one signature each of the one-file int8 graph:
    same outputs bit for bit, weights stored after the flatbuffer (16-byte aligned); their
    FULLY_CONNECTED ops in the form tflite-runtime runs (export/hybrid_fc.py)."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.errors import QuantizationError
    from gemma_edge.export.hybrid_fc import channel_scales_to_mul
    from gemma_edge.export.signatures import extract_signature, signature_keys

    manifest = load_manifest(tiny_artifacts)
    buckets, hidden = manifest["buckets"], manifest["model"]["hidden_size"]
    shared = (tiny_artifacts / "encoder_int8_all.tflite").read_bytes()
    keys = signature_keys(shared)
    assert len(keys) == len(buckets) > 1
    rng = np.random.default_rng(0)
    for seq_len in buckets:
        key = f"encode_{seq_len}"
        one = (tiny_artifacts / f"encoder_int8_{seq_len}.tflite").read_bytes()
        assert one == channel_scales_to_mul(extract_signature(shared, key))
        assert signature_keys(one) == [key]
        assert len(one) < len(shared)
        feeds = {"embeddings": rng.normal(0.0, 0.05, (1, seq_len, hidden)).astype(np.float32),
                 "mask": np.ones((1, seq_len, seq_len), np.float32),
                 "pool": np.zeros((1, find_graph(manifest, "int8", seq_len)["pool_slots"],
                                   seq_len), np.float32)}
        feeds["pool"][0, 0] = 1.0
        got = Interpreter(model_content=one).get_signature_runner(key)(**feeds)
        want = Interpreter(model_content=shared).get_signature_runner(key)(**feeds)
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(QuantizationError, match="signature 'encode_7' not in the model"):
        extract_signature(shared, "encode_7")


def test_max_open_graphs_bounds_open_files(tiny_artifacts, embedder):
    # the Interpreter path (no weight cache) runs the per-bucket int8 files
    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", max_open_graphs=1,
                   pack_tokens=0, weight_cache=False)
    texts = ["a", "a much longer text about foxes and the lazy dog " * 2, "b c d e f g h i j k"]
    out = emb.encode_query(texts)
    assert len(emb.graphs.open_files) == 1
    again = Embedder(tiny_artifacts, backend="cpu", precision="int8", pack_tokens=0,
                     weight_cache=False)
    np.testing.assert_allclose(out, again.encode_query(texts), atol=1e-6)
    assert len(again.graphs.open_files) > 1


def test_int8_buckets_share_one_file_through_the_weight_cache(tiny_artifacts, tmp_path):
    """CompiledModel runs every int8 bucket from the one-file export: one open file,
    one packed copy of the weights, the same vectors as the per-bucket files."""
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    shared = [g for g in manifest["graphs"] if g["role"] == "int8-shared"]
    per_bucket = [g for g in manifest["graphs"] if g["role"] == "int8"]
    assert len(shared) == 1 and len(per_bucket) == len(manifest["buckets"]) > 1
    assert shared[0]["seq_lens"] == manifest["buckets"]
    assert set(shared[0]["census"]) == set(per_bucket[0]["census"])
    # the export compared the two on its verification texts
    assert manifest["verification"]["int8"]["shared_file_max_abs_diff"] <= 1e-5
    texts = ["a", "a much longer text about foxes and the lazy dog " * 2, "b c d e f g h i j k"]
    cache = tmp_path / "cache"
    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", pack_tokens=0,
                   weight_cache=cache)
    out = emb.encode_query(texts)
    assert len(emb.graphs.runners) > 1  # several buckets ran ...
    assert emb.graphs.open_files == [shared[0]["path"]]  # ... from one file
    assert len(list(cache.glob("*.xnnpack"))) == 1
    plain = Embedder(tiny_artifacts, backend="cpu", precision="int8", pack_tokens=0,
                     weight_cache=False)
    np.testing.assert_allclose(out, plain.encode_query(texts), atol=1e-6)


def test_quick_evaluation_in_manifest(tiny_artifacts):
    m = load_manifest(tiny_artifacts)
    ev = m["evaluation"]
    assert ev["queries"] >= 100
    # the quantised graphs (the float ones are verified earlier in the export)
    assert "float" not in ev and set(ev["int8"]) == {"256", "128"} == set(ev["full-int8"])
    assert 0.9 < ev["int8"]["256"]["cosine_mean"] < 1.0
    assert set(ev["seconds"]) == {"reference", "int8", "full-int8"}
    assert "same_tokens" not in ev["int8"]["256"]  # its buckets reach the reference's 64
    same = ev["full-int8"]["256"]["same_tokens"]  # the segments stop at 32 tokens
    assert same["max_tokens"] == 32 and same["truncated_texts"] > 0


@pytest.mark.parametrize("kwargs,flag", [({"buckets": (4, 32)}, "--seq-len"),
                                         ({"edgetpu_buckets": (64, 4)}, "--edgetpu-seq-len"),
                                         ({"edgetpu_buckets": ()}, "--edgetpu-seq-len"),
                                         ({"edgetpu_mlp_split": 1.0}, "--edgetpu-mlp-split"),
                                         ({"edgetpu_mlp_split": -0.1}, "--edgetpu-mlp-split"),
                                         ({"edgetpu_softmax_split": 1.0},
                                          "--edgetpu-softmax-split")])
def test_export_options_reject_bad_buckets(kwargs, flag):
    from gemma_edge.export.pipeline import ExportOptions

    with pytest.raises(InputError, match=flag):
        ExportOptions(**kwargs).validate()
