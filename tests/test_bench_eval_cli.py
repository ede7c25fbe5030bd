"""Benchmark, evaluation and embed commands on the tiny export."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gemma_edge.cli import main
from gemma_edge.device import bench
from gemma_edge.errors import InputError


def test_measure_reports_every_figure(tiny_artifacts):
    result = bench.measure(tiny_artifacts, "cpu", "int8", runs=3, bulk=12, threads=1)
    assert set(result["buckets"]) == {"16", "32", "64"}
    for stats in result["buckets"].values():
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert set(result["query_stages_ms"]) == {"tokenize", "lookup", "invoke", "post"}
    assert result["bulk_packed_texts_per_s"] > 0 and result["peak_rss_mb"] > 10
    assert 0 < result["bulk_model_speedup"] <= result["bulk_bound_speedup"]
    tokens = result["bulk_tokens"]
    assert result["bulk_packed_tokens_per_s"] == pytest.approx(
        result["bulk_packed_texts_per_s"] * tokens["mean"])
    assert 0 < tokens["median"] <= tokens["max"] and 0 < tokens["mean"] <= tokens["max"]
    assert result["graph_role"] == "int8"
    kinds = result["resident_by_kind_mb"]
    if sys.platform.startswith("linux"):  # the split adds up to the resident set
        assert kinds["libraries (.so)"] > 1 and kinds["packed weights (XNNPACK cache)"] > 0
        total = sum(kinds.values())
        assert abs(total - result["rss_stages_mb"]["after_bulk"]) < 0.1 * total


def test_bulk_modes_interleaved_and_planned_speedup(tiny_artifacts):
    from gemma_edge.device import Embedder
    from gemma_edge.device.embedder import document_text

    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", num_threads=1)
    docs = [" ".join(["note"] * (1 + i % 5)) for i in range(20)]  # short: they can share
    emb.pack_tokens = 7  # the passes set their own bound and give this one back
    seconds = bench.bulk_passes(emb, docs, batch=8)
    assert set(seconds) == {"packed", "padded"} and min(seconds.values()) > 0
    assert emb.pack_tokens == 7
    # Costed at 1 ms per call, the prediction is the number of calls saved by packing:
    # texts / runs of the Embedder's own plans (batches of 8).
    lengths = [len(i) for i in emb.tokenizer.encode([document_text(d) for d in docs],
                                                    emb.max_tokens)[0]]
    emb.pack_tokens = min(emb.max_tokens, 256)
    runs = sum(len(emb.plan(lengths[s:s + 8])) for s in range(0, 20, 8))
    assert runs < 20  # short documents do share buckets
    emb.pack_tokens = 7
    flat = {b: 1.0 for b in emb.buckets}
    predicted = bench.planned_speedup(emb, docs, flat, batch=8)
    assert predicted["plan"] == pytest.approx(20 / runs)
    # the bound: all tokens in the largest bucket (cheapest per token at 1 ms a call)
    assert predicted["bound"] == pytest.approx(20 * emb.max_tokens / sum(lengths))
    assert predicted["bound"] >= predicted["plan"]
    # costed per token of the bucket, packing still wins (it fills the padding), and the
    # bound is what padding wastes: padded tokens / real tokens
    per_token = {b: float(b) for b in emb.buckets}
    predicted = bench.planned_speedup(emb, docs, per_token, batch=8)
    assert 1.0 < predicted["plan"] <= predicted["bound"]
    assert predicted["bound"] == pytest.approx(sum(emb.bucket_for(n) for n in lengths)
                                               / sum(lengths))
    assert emb.pack_tokens == 7


def test_given_queries_timed_one_by_one(tiny_artifacts, tmp_path):
    from gemma_edge.device import Embedder
    from gemma_edge.device.bench_queries import describe, load_queries, time_queries

    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8", num_threads=1)
    queries = ["reset router", "a much longer question " * 4, "kurz"]
    figures = time_queries(emb, queries)
    assert figures["n"] == 3 and len(figures["times_ms"]) == 3
    assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"]
    lengths = [len(i) for i in emb.tokenizer.encode(
        [emb.prompts["query"] + q for q in queries], emb.max_tokens)[0]]
    assert figures["tokens"]["min"] == min(lengths) and figures["tokens"]["max"] == max(lengths)
    # every query counted in the bucket its length chooses
    expected = {}
    for n in lengths:
        expected[str(emb.bucket_for(n))] = expected.get(str(emb.bucket_for(n)), 0) + 1
    assert {b: v["n"] for b, v in figures["by_bucket"].items()} == expected
    assert "given queries (3," in describe("int8", figures)
    # files: one per line or .jsonl; the held-out set by name; an empty file is refused
    (tmp_path / "q.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_queries(str(tmp_path / "q.txt")) == ["one", "two"]
    assert len(load_queries("heldout")) > 100
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="no queries"):
        load_queries(str(tmp_path / "empty.txt"))


def test_bench_cli_refuses_missing_queries_file(tiny_artifacts, tmp_path, capsys):
    code = main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--bulk", "0",
                 "--precisions", "int8", "--queries", str(tmp_path / "nope.txt")])
    assert code != 0
    assert "nope.txt: no such file" in capsys.readouterr().err


def _report(float_ms: float, int8_ms: float) -> dict:
    return {"results": {p: {"buckets": {"256": {"p50": ms}}}
                        for p, ms in (("float", float_ms), ("int8", int8_ms))}}


def test_latency_check_compares_ratios(capsys):
    assert bench.latency_check(_report(100.0, 45.0), 0.5) == 0
    assert bench.latency_check(_report(100.0, 55.0), 0.5) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_cli_writes_json_and_plot(tiny_artifacts, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"text": "where is the manual"}\n{"text": "wie spät ist es"}\n',
                       encoding="utf-8")
    code = main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--bulk", "8",
                 "--precisions", "float,int8", "--json", str(out), "--plot", str(png),
                 "--queries", str(queries)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"float", "int8"}
    int8 = report["results"]["int8"]
    # short and longer queries are timed separately; the longer ones really are longer
    assert int8["query_end_to_end_ms"]["n"] == int8["longer_query_end_to_end_ms"]["n"] == 3
    assert int8["longer_query_tokens"]["max"] > int8["query_tokens"]["max"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert int8["given_queries"]["n"] == report["results"]["float"]["given_queries"]["n"] == 2


def test_eval_on_heldout(tiny_artifacts, tiny_checkpoint, tmp_path):
    from gemma_edge.export.evaluate import evaluate

    report = evaluate(tiny_artifacts, tiny_checkpoint, ["float", "int8"], dims=[256, 128])
    f = report["precisions"]["float"]["256"]
    assert f["cosine"]["min"] > 0.9999
    assert abs(f["mrr_delta"]) < 1e-3
    assert report["queries"] >= 100 and "en" in f["per_language"]
    q = report["precisions"]["int8"]["128"]
    assert 0.9 < q["cosine"]["mean"] < 1.0
    alone = evaluate(tiny_artifacts, tiny_checkpoint, ["float"], dims=[128], pack_tokens=0)
    assert alone["pack_tokens"] == 0
    assert alone["precisions"]["float"]["128"]["cosine"]["min"] > 0.9999


def test_eval_separates_the_length_limit(tiny_artifacts, tiny_checkpoint, tmp_path):
    """A graph set stopping at 32 tokens cuts texts the reference embeds up to 64: against
    the reference cut at 32 the float graphs are exact again, and only the cut texts
    differ between the two figures."""
    import json
    import shutil

    from gemma_edge.export.evaluate import evaluate

    art = tmp_path / "short-float"
    shutil.copytree(tiny_artifacts, art)
    manifest = json.loads((art / "manifest.json").read_text())
    for graph in manifest["graphs"]:
        if graph["role"] == "float":
            graph["seq_lens"] = [s for s in graph["seq_lens"] if s <= 32]
    (art / "manifest.json").write_text(json.dumps(manifest))
    entry = evaluate(art, tiny_checkpoint, ["float"], dims=[256])["precisions"]["float"]["256"]
    same = entry["cosine_same_tokens"]
    assert same["max_tokens"] == 32 and same["truncated_texts"] > 0
    assert same["min"] > 0.9999 and entry["cosine"]["min"] < 0.999
    whole = evaluate(tiny_artifacts, tiny_checkpoint, ["float"], dims=[256])
    assert "cosine_same_tokens" not in whole["precisions"]["float"]["256"]


def test_embed_cli(tiny_artifacts, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n{"text": "world"}\n', encoding="utf-8")
    out = tmp_path / "out.npy"
    assert main(["embed", "--artifacts", str(tiny_artifacts), "--input", str(src),
                 "--output", str(out), "--dim", "128", "--backend", "cpu"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("content,message", [
    ('{"txt": 1}\n', "string 'text'"),
    ("{oops\n", "not JSON"),
    ("", "no texts"),
])
def test_embed_cli_bad_input(tiny_artifacts, tmp_path, capsys, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content, encoding="utf-8")
    code = main(["embed", "--artifacts", str(tiny_artifacts), "--input", str(src),
                 "--output", str(tmp_path / "o.npy")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_embed_cli_missing_artifacts(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    code = main(["embed", "--artifacts", str(tmp_path / "nope"), "--input", str(src),
                 "--output", str(tmp_path / "o.npy")])
    assert code == 2 and "not a directory" in capsys.readouterr().err


def test_calibration_tensors_per_bucket(tiny_artifacts, tmp_path):
    assert main(["calibration", "--artifacts", str(tiny_artifacts), "--out", str(tmp_path),
                 "--per-bucket", "6"]) == 0
    for seq_len in (16, 32, 64):
        data = np.load(tmp_path / f"calibration_{seq_len}.npz")
        assert data["embeddings"].shape == (6, seq_len, 96)
        assert data["mask"].shape == (6, seq_len, seq_len) and data["pool"].shape == (6, 4, seq_len)
        assert (data["pool"].sum(axis=(1, 2)) > 0).all()  # every sample pools real tokens
        assert set(np.unique(data["mask"])) <= {0.0, 1.0}


def test_op_group_reads_litert_torch_names():
    from gemma_edge.export.evaluate import op_group

    base = "gemma_edge.export.convert._Named/gemma_edge.export.encoder.BucketEncoder_inner/"
    assert op_group(base + "gemma_edge.export.encoder.EncoderLayer_3/"
                    "torch.nn.modules.linear.Linear_qkv_proj;") == ("layer 03", "attention")
    assert op_group(base + "gemma_edge.export.encoder.EncoderLayer_12/"
                    "torch.nn.modules.linear.Linear_gate_up_proj;7") == ("layer 12", "mlp")
    assert op_group(base + "gemma_edge.export.encoder.RMSNorm_final_norm;1") == (
        "outside layers", "norm")


def test_sensitivity_per_layer(tiny_artifacts, tiny_checkpoint):
    from gemma_edge.export.evaluate import sensitivity

    report = sensitivity(tiny_checkpoint, tiny_artifacts, "int8", 16, samples=2)
    layers = {key.split(" / ")[0] for key in report}
    assert {"layer 00", "layer 01", "layer 02", "layer 03"} <= layers
    for value in report.values():
        assert np.isfinite(value["mean_snr_db"]) and value["tensors"] > 0
    assert min(v["mean_snr_db"] for v in report.values()) < 100  # quantisation is visible


def test_sensitivity_per_segment(tiny_artifacts, tiny_checkpoint):
    from gemma_edge.export.evaluate import sensitivity

    report = sensitivity(tiny_checkpoint, tiny_artifacts, "full-int8", 32, samples=2)
    assert set(report) == {f"layer {i:02d} / {k}" for i in range(4) for k in ("attn", "mlp")}
    for value in report.values():  # int8 noise is there, and it is not garbage
        assert 5.0 < value["mean_snr_db"] < 80.0, report


@pytest.mark.slow
def test_latency_check_on_a_mid_size_model(tmp_path, capsys):
    """CI's latency check (`make latency-check`'s code path) on a 13M-parameter random
    Gemma3 encoder: large enough that weights and matmuls dominate, as on the real model,
    so int8 must beat float by a wide margin in the same run. Measured here 0.34-0.38
    (the real model: 0.34 at 256 tokens, target 0.5); the limit 0.6 leaves room for a
    loaded CI machine."""
    from gemma_edge.export.pipeline import ExportOptions, run_export
    from gemma_edge.export.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "mid", hidden_size=384, num_layers=6,
                                 head_dim=128, intermediate_size=1536, vocab_size=2000,
                                 dense_hidden=768, output_dim=384, sliding_window=32)
    art = tmp_path / "mid-art"
    run_export(str(ckpt), art, ExportOptions(buckets=(64,), pool_slots=4, edgetpu=False,
                                             evaluate=False))
    code = main(["bench", "--artifacts", str(art), "--precisions", "float,int8", "--runs", "15",
                 "--bulk", "0", "--check", "--max-ratio", "0.6"])
    out = capsys.readouterr().out
    assert "latency check @ 64 tokens" in out
    assert code == 0, out


def test_eval_rejects_bad_dims(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--artifacts", str(tmp_path), "--checkpoint", str(tmp_path),
              "--dims", "128,x"])
    assert exc.value.code == 2 and "expected comma-separated integers" in capsys.readouterr().err
