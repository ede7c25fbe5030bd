"""Segmented full-int8 encoder: float-exact rewrite, fully int8 Coral-mappable segments,
the device's host loop (tiny random model, no real checkpoint)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("litert_torch")

BUCKET = 32


def one_graph_attention():
    """The shipped recipe with the attention in one int8 graph at every bucket (the
    tests of that graph's softmax chain; the short buckets split it by default)."""
    from gemma_edge.export.segments.recipe import DEFAULT_RECIPE

    return DEFAULT_RECIPE.with_splits(host_attention_upto=0)


def test_segmented_rewrite_is_exact_in_float(tiny_core, calibration):
    from gemma_edge.export import segments as seg
    from gemma_edge.export.segments import FLOAT_EQUALITY, check_float

    samples = calibration[BUCKET]
    scales = seg.measure_scales(tiny_core, samples)
    assert not np.allclose(scales[0].attn_in, 1.0) and not np.allclose(scales[0].act, 1.0)
    segments = seg.layer_segments(tiny_core, BUCKET, scales)
    assert check_float(tiny_core, scales, segments, samples) >= FLOAT_EQUALITY
    # calibration inputs from the encoder's own layers = those of the float segments
    fast = seg.segment_inputs(tiny_core, scales, samples[:2])
    slow: dict = {}

    def run(i, kind, x, mask):
        slow.setdefault((i, kind), []).append(x.numpy())
        return seg.torch_runner(segments)(i, kind, x, mask)

    for sample in samples[:2]:
        seg.host_forward(tiny_core, scales, run, *seg.sample_tensors(sample))
    assert fast.keys() == slow.keys() and len(fast[(0, "attn")]) == 2
    for key, feeds in fast.items():
        for feed, ref in zip(feeds, slow[key]):
            got = feed["a" if key[1] == "attn" else "b"]
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), key


def test_float_check_catches_a_wrong_rewrite(tiny_core, calibration):
    from gemma_edge.errors import QuantizationError
    from gemma_edge.export import segments as seg
    from gemma_edge.export.segments import check_float

    scales = seg.measure_scales(tiny_core, calibration[BUCKET][:2])
    segments = seg.layer_segments(tiny_core, BUCKET, scales)
    with torch.no_grad():
        segments[0][1].up[0].weight.add_(0.5)  # (a uniform scale would be exact: post-norm)
    with pytest.raises(QuantizationError):
        check_float(tiny_core, scales, segments, calibration[BUCKET])


@pytest.mark.slow
def test_export_writes_fully_int8_segments_the_embedder_runs(tiny_checkpoint, tmp_path, capsys,
                                                               caplog):
    from gemma_edge.compile.mapper import analyze
    from gemma_edge.device import Embedder
    from gemma_edge.export.pipeline import ExportOptions, run_export
    from gemma_edge.export.quantize import tensor_dtype_census
    from gemma_edge.manifest import find_graph, load_manifest

    out = tmp_path / "art"
    # bucket 16 with its attention core on the host (three graphs a layer), 32 without
    manifest = run_export(str(tiny_checkpoint), out, ExportOptions(
        buckets=(16, 32), pool_slots=2, edgetpu_buckets=(16, 32), evaluate=False,
        edgetpu_host_attention_upto=16))
    layers = manifest["model"]["num_layers"]
    split = find_graph(manifest, "edgetpu", 16)
    assert split["smoothing"]["host_attention_upto"] == 16
    assert [n.split("/")[1].rsplit("_", 2)[0] for n in split["segments"][:3]] == [
        "attn_qkv", "attn_o", "mlp"] and len(split["segments"]) == 3 * layers
    assert set(split["census"]) <= {"INT8", "INT32"}, split["census"]
    for name in split["segments"][:2]:  # each projection: one 1x1 convolution, nothing else
        g = analyze(out / name).to_json()["graphs"][0]
        assert g["cut"] is None and g["op_share"] == 1.0, g["cut"]
        assert Counter(o["op"] for o in g["operators"]) == {"CONV_2D": 1}, name
    graph = find_graph(manifest, "edgetpu", 32)
    assert graph["layout"] == "segments" and len(graph["segments"]) == 2 * layers
    assert set(graph["census"]) <= {"INT8", "INT32"}, graph["census"]
    assert graph["smoothing"]["mlp_split"] == 0.125  # the two-range GELU product
    assert graph["float_min_cosine"] >= 0.99999  # the rewrite checked in float first
    assert "full-int8" in manifest["verification"]
    load_manifest(out, verify_hashes=True)  # every segment file is listed and hashed
    assert all(name in manifest["files"] for name in graph["segments"])

    for name in graph["segments"][:2]:  # one attention, one MLP segment
        path = out / name
        assert set(tensor_dtype_census(path.read_bytes())) <= {"INT8", "INT32"}
        report = analyze(path)
        assert report.compiles, report.fatal
        g = report.to_json()["graphs"][0]
        assert g["cut"] is None and g["op_share"] == 1.0, g["cut"]
        ops = Counter(o["op"] for o in g["operators"])
        for banned in ("GELU", "BATCH_MATMUL", "SOFTMAX", "FULLY_CONNECTED", "EXP",
                       "QUANTIZE", "DEQUANTIZE"):
            assert banned not in ops, (banned, ops)
        # attention: q, k, v, o + 2 mean squares; MLP: gate, up, down + the two-range
        # product's fine up and down (SegmentRecipe.mlp_split)
        assert ops["CONV_2D"] == (6 if "attn" in name else 5)

    # the pre-flight over the whole bucket: co-compiled segments + the host's share
    import json

    from gemma_edge.cli import main
    capsys.readouterr()
    assert main(["check", str(out), "--json"]) == 0
    buckets = json.loads(capsys.readouterr().out)["buckets"]
    assert buckets["16"]["models"] == 3 * layers
    summary = buckets["32"]
    assert summary["models"] == 2 * layers and summary["tpu_ops"] == summary["ops"]
    assert 0.5 < summary["mac_share"] < 1.0  # tiny model: the host's Dense head weighs more
    assert summary["cached_bytes"] + summary["streamed_bytes"] == summary["param_bytes"]

    texts = ["hello world", "edge tpu embeddings on a small board", "x"]
    emb = Embedder(out, backend="cpu", precision="full-int8")
    assert emb.graph_role == "edgetpu"
    ours = emb.encode_query(texts)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    ref = Embedder(out, backend="cpu", precision="float").encode_query(texts)
    cos = (ours * ref).sum(1)
    assert cos.min() > 0.9, cos  # int8 noise on a random model, not a broken pipeline
    # packed (several texts per bucket) equals one by one
    single = np.stack([emb.encode_query([t])[0] for t in texts])
    np.testing.assert_allclose(single, ours, atol=2e-2)
    # the short texts ran in the 16-token bucket, whose attention is split
    assert any(f.endswith("#16") for f in emb.graphs.open_files), emb.graphs.open_files

    # the segments stop at 32 tokens, the float graphs at 32 too: a plain warning
    with caplog.at_level(logging.WARNING, logger="gemma_edge.device"):
        emb.encode_query(["word " * 100])
    assert "truncated" in caplog.text and "takes up to" not in caplog.text


def test_truncation_warning_names_the_longer_graphs(tiny_artifacts, caplog):
    """The segments stop at 32 tokens while the CPU graphs take 64: the warning says so."""
    from gemma_edge.device import Embedder

    emb = Embedder(tiny_artifacts, backend="cpu", precision="full-int8")
    with caplog.at_level(logging.WARNING, logger="gemma_edge.device"):
        emb.encode_query(["word " * 100])
    assert "exceed 32 tokens and were truncated" in caplog.text
    assert "takes up to 64" in caplog.text


def test_segmented_runner_explains_broken_artifacts(tiny_artifacts, tmp_path):
    import shutil

    from gemma_edge.device.segment_host import SegmentRunner
    from gemma_edge.errors import ArtifactError
    from gemma_edge.graph_entries import GraphEntry
    from gemma_edge.manifest import find_graph, load_manifest

    graph = find_graph(load_manifest(tiny_artifacts), "edgetpu", BUCKET)

    def never_opened(path):
        raise AssertionError(f"{path} opened despite the broken artifacts")

    short = dict(graph, segments=graph["segments"][:-1])
    with pytest.raises(ArtifactError, match="segments for 4 layers"):
        SegmentRunner(tiny_artifacts, GraphEntry.from_json(short), BUCKET, never_opened)
    (tmp_path / "edgetpu").mkdir()
    (tmp_path / graph["path"]).write_bytes(b"not an npz")
    for name in graph["segments"]:
        shutil.copy(tiny_artifacts / name, tmp_path / name)
    with pytest.raises(ArtifactError, match="host.npz: cannot read the segment constants"):
        SegmentRunner(tmp_path, GraphEntry.from_json(graph), BUCKET, never_opened)


def test_profiler_calibration_equals_the_tensor_copying_one(tiny_core, calibration):
    """The export's calibration (ai-edge-quantizer's profiler-based mode) gives every
    tensor the ranges its default mode (each tensor copied out) gives."""
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.calibrator import CalibrationMode

    from gemma_edge.export import segments as seg
    from gemma_edge.export.quantize import min_max_calibration
    from gemma_edge.export.segments import float_segment

    samples = calibration[BUCKET][:3]
    scales = seg.measure_scales(tiny_core, samples, one_graph_attention())
    segments = seg.layer_segments(tiny_core, BUCKET, scales)
    feeds = seg.segment_inputs(tiny_core, scales, samples)
    for kind, segment in zip(("attn", "mlp"), segments[0]):
        graph = float_segment(kind, segment, BUCKET, tiny_core.spec.hidden_size)
        qt = quantizer.Quantizer(bytearray(graph))
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        fast = min_max_calibration(qt, "segment", feeds[(0, kind)], 1, graph)
        slow = qt.calibrate({"segment": feeds[(0, kind)]}, num_threads=1,
                            mode=CalibrationMode.CALIBRATION_PRESERVE_ALL_TENSORS)
        assert fast.keys() == slow.keys() and len(fast) > 10
        for name, qsv in slow.items():
            for key in ("min", "max"):
                want = np.asarray(qsv[key], np.float64)
                got = np.asarray(fast[name][key], np.float64)
                assert got.shape == want.shape, name
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_embedder_runs_compiled_segments_through_the_edgetpu_route(tiny_artifacts, tmp_path,
                                                                   monkeypatch):
    """backend auto -> Edge TPU when compiled segments and a device exist. No Coral here:
    the delegate factory is replaced by CPU interpreters of the uncompiled segments, so
    the route (probe, one LRU slot for the bucket, no page release) is what is tested."""
    import json
    import shutil

    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.device import Embedder, edgetpu
    from gemma_edge.manifest import describe_files

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    manifest = json.loads((art / "manifest.json").read_text())
    source = next(g for g in manifest["graphs"] if g["role"] == "edgetpu")
    compiled = []
    for name in source["segments"]:
        target = name.replace(".tflite", "_edgetpu.tflite")
        shutil.copy(art / name, art / target)
        compiled.append(target)
    manifest["graphs"].append(dict(source, role="edgetpu-compiled", segments=compiled))
    manifest["files"].update(describe_files(art, compiled))  # verified at their first open
    (art / "manifest.json").write_text(json.dumps(manifest))
    opened = []

    def fake_delegate_interpreter(model_path, device=None, num_threads=None):
        opened.append(model_path.name)
        uncompiled = str(model_path).replace("_edgetpu.tflite", ".tflite")
        return Interpreter(model_path=uncompiled, num_threads=num_threads)

    monkeypatch.setattr(edgetpu, "make_edgetpu_interpreter", fake_delegate_interpreter)
    emb = Embedder(art, backend="auto")
    assert (emb.backend, emb.graph_role, emb.precision) == ("edgetpu", "edgetpu-compiled", "int8")
    texts = ["hello world", "edge devices embed text locally"]
    on_tpu = emb.encode_query(texts)
    assert set(opened) == {p.split("/")[-1] for p in compiled}
    cpu = Embedder(art, backend="cpu", precision="full-int8").encode_query(texts)
    np.testing.assert_allclose(on_tpu, cpu, atol=1e-6)


def test_row_blocks_of_one_product_share_one_range(tiny_core, calibration):
    """Attention products cut into row blocks (MUL + SUM per block, concatenated) get
    the union of their calibrated ranges: a block whose rows were mostly padding during
    calibration must not clip the real tokens a packed bucket puts there."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.export import segments as seg
    from gemma_edge.export.quantize import row_block_groups, unify_ranges
    from gemma_edge.export.segments import quantize_segment
    from gemma_edge.export.segments.graph import _AttnSeg, _convert_segment

    samples = calibration[BUCKET][:4]
    scales = seg.measure_scales(tiny_core, samples, one_graph_attention())
    hd = tiny_core.layers[0].head_dim
    segments = seg.layer_segments(tiny_core, BUCKET, scales, max_product=BUCKET * hd * 8)
    feeds = seg.segment_inputs(tiny_core, scales, samples)[(0, "attn")]
    hidden = tiny_core.spec.hidden_size
    float_model = _convert_segment(_AttnSeg(segments[0][0]), {
        "a": torch.zeros(1, 1, BUCKET, hidden), "mask": torch.ones(1, BUCKET, BUCKET)})
    groups = row_block_groups(float_model)
    # the q.k products and the p.v products of the softmax weights' two ranges
    assert len(groups) == 3 and all(len(g) > 2 for g in groups)

    ranges = {n: {"min": np.array(-float(i + 1)), "max": np.array(float(i))}
              for i, n in enumerate(groups[0])}
    assert unify_ranges(ranges, groups) == len(groups[0])
    assert {float(r["max"]) for r in ranges.values()} == {len(groups[0]) - 1.0}
    assert {float(r["min"]) for r in ranges.values()} == {-float(len(groups[0]))}

    interp = Interpreter(model_content=quantize_segment("attn", segments[0][0], BUCKET, hidden,
                                                        feeds))
    ops = interp._get_ops_details()
    scale = {t["index"]: float(t["quantization"][0]) for t in interp.get_tensor_details()}
    producer = {out: op for op in ops for out in op["outputs"]}
    concats = [op for op in ops if op["op_name"] == "CONCATENATION"
               and all(producer[i]["op_name"] == "SUM" for i in op["inputs"])]
    assert len(concats) == 3
    for op in concats:
        muls = [producer[producer[i]["inputs"][0]] for i in op["inputs"]]
        assert all(m["op_name"] == "MUL" for m in muls)
        assert len({scale[m["outputs"][0]] for m in muls}) == 1


def test_two_range_softmax_is_exact_in_float_and_fully_int8(tiny_core, calibration, tmp_path):
    """softmax_split: exp(-y) as r * min(exp(-y) / r, 1) plus its excess beyond r, each
    weighting v in its own int8 range. Exact in float, fully int8, Edge TPU-mappable."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.compile.mapper import analyze
    from gemma_edge.export import segments as seg
    from gemma_edge.export.quantize import check_fully_int8
    from gemma_edge.export.segments import (
        FLOAT_EQUALITY,
        check_float,
        host_constants,
        quantize_segment,
        scales_from_host,
    )

    samples = calibration[BUCKET]
    scales = seg.measure_scales(tiny_core, samples, seg.SegmentRecipe(
        softmax_split=0.125, softmax_split_from=BUCKET, host_attention_upto=0))
    assert all(s.softmax_split == 0.125 for s in scales)
    segments = seg.layer_segments(tiny_core, BUCKET, scales)
    # only buckets from softmax_split_from up carry the two ranges; the host file keeps
    # the rule (the sensitivity report rebuilds the float segments from it)
    assert segments[0][0].softmax_split == 0.125
    assert seg.layer_segments(tiny_core, BUCKET // 2, scales)[0][0].softmax_split == 0.0
    again = scales_from_host(host_constants(tiny_core, scales))
    assert [(s.softmax_split, s.softmax_split_from) for s in again] == [(0.125, BUCKET)] * len(
        scales)
    assert check_float(tiny_core, scales, segments, samples) >= FLOAT_EQUALITY
    feeds = seg.segment_inputs(tiny_core, scales, samples[:3])[(0, "attn")]
    data = quantize_segment("attn", segments[0][0], BUCKET, tiny_core.spec.hidden_size, feeds)
    check_fully_int8(data)
    ops = [op["op_name"] for op in Interpreter(model_content=data)._get_ops_details()]
    assert "QUANTIZE" not in ops and "DEQUANTIZE" not in ops, ops
    assert ops.count("LOGISTIC") == 4  # two exp(-y) chains: coarse and fine
    path = tmp_path / "attn.tflite"
    path.write_bytes(data)
    report = analyze(path)
    assert report.compiles, report.fatal


def test_segments_built_in_worker_processes_equal_the_inline_build(tiny_core, calibration,
                                                                   tmp_path):
    """Two worker processes (the export's default on 2 cores) filling segment templates
    write the same files as one process converting every segment."""
    from gemma_edge.export.segments import build_segmented

    samples = {BUCKET: calibration[BUCKET][:3]}
    # inline: every segment converted by litert-torch; pooled: filled into templates
    inline = build_segmented(tiny_core, tmp_path / "one", [BUCKET], samples, workers=1,
                             templates=False)
    pooled = build_segmented(tiny_core, tmp_path / "two", [BUCKET], samples, workers=2)
    assert inline == pooled
    for name in inline[0]["segments"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize("split", [False, True], ids=["one-graph-attention", "split-attention"])
def test_segment_templates_give_the_graphs_litert_torch_converts(tiny_core, calibration, split):
    """A template converted once per structure, filled with each layer's tensors, is the
    float graph litert-torch converts for that layer, byte for byte."""
    from gemma_edge.export import segments as seg
    from gemma_edge.export.segments import build_template, float_segment, template_key

    samples = calibration[BUCKET][:3]
    recipe = one_graph_attention().with_splits(host_attention_upto=BUCKET if split else 0)
    scales = seg.measure_scales(tiny_core, samples, recipe)
    hidden = tiny_core.spec.hidden_size
    templates: dict = {}
    for pair in seg.layer_segments(tiny_core, BUCKET, scales):
        for kind, segment in seg.graph_parts(pair):
            key = template_key(segment)
            if key not in templates:
                templates[key] = build_template(kind, segment, BUCKET, hidden)
            assert templates[key] is not None and templates[key].maps
            assert templates[key].fill(segment) == float_segment(kind, segment, BUCKET, hidden)
    # one graph: the tiny model's sliding and global layers differ (the band mask), + MLP;
    # split: the qkv and o projections are the same graph in every layer, + MLP
    assert sorted(t.kind for t in templates.values()) == (
        ["attn_o", "attn_qkv", "mlp"] if split else ["attn", "attn", "mlp"])


class _Folded(torch.nn.Module):
    """A segment whose graph holds a constant computed from a tensor (``v * 2``)."""

    def __init__(self, hidden: int, seed: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(hidden, generator=gen), requires_grad=False)
        self.register_buffer("v", torch.randn(hidden, generator=gen).to(dtype))

    def graph_options(self) -> tuple:
        return ("folded",)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * self.w + self.v * 2.0


@pytest.mark.slow
def test_segment_template_checks_each_graph_and_converts_when_it_differs(caplog):
    from gemma_edge.export.segments import build_template, fill_checked, float_segment

    hidden, seq = 16, 4
    feed = {"b": np.random.default_rng(0).standard_normal((1, 1, seq, hidden), np.float32)}
    template = build_template("mlp", _Folded(hidden, 0), seq, hidden)
    assert template is not None  # w is rewritable, the folded v * 2 is not
    other = _Folded(hidden, 1)
    with caplog.at_level(logging.WARNING, logger="gemma_edge.export"):
        graph = fill_checked(template, "mlp", other, seq, hidden, feed)
    assert "differs from the torch segment" in caplog.text
    assert graph == float_segment("mlp", other, seq, hidden)
    # tensors that are not float32 cannot be probed: no template, every layer converted
    assert build_template("mlp", _Folded(hidden, 0, torch.float64), seq, hidden) is None


def test_two_range_gelu_product_is_exact_in_float_and_fully_int8(tiny_core, calibration,
                                                                  tmp_path):
    """mlp_split: the GELU product as a fine int8 tensor (saturating at a fraction of its
    range) plus the excess beyond it. Exact in float; in int8 the excess is exactly 0
    below the saturation level, the graph is fully int8 and Edge TPU-mappable, and the
    segment's output is closer to float than with one int8 product."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.compile.mapper import analyze
    from gemma_edge.device.segment_host import SegmentGraph
    from gemma_edge.export import segments as seg
    from gemma_edge.export.coral_ops import apply_conv, gelu_sigmoid
    from gemma_edge.export.quantize import check_fully_int8
    from gemma_edge.export.segments import (
        FLOAT_EQUALITY,
        check_float,
        quantize_segment,
    )

    samples = calibration[BUCKET]
    hidden = tiny_core.spec.hidden_size
    split = seg.measure_scales(tiny_core, samples, seg.SegmentRecipe(mlp_split=0.125))
    one = seg.measure_scales(tiny_core, samples, seg.SegmentRecipe(mlp_split=0.0))
    assert all(s.act_split > 0 for s in split) and all(s.act_split == 0 for s in one)
    # the two partials (fine, excess) go to the host, each with its own output scales
    assert split[0].ff_out.shape == (2, hidden) and one[0].ff_out.shape == (hidden,)
    assert not np.allclose(split[0].ff_out[0], split[0].ff_out[1])
    split_segments = seg.layer_segments(tiny_core, BUCKET, split)
    assert check_float(tiny_core, split, split_segments, samples) >= FLOAT_EQUALITY
    # ... or are added in the graph (mlp_host_sum=False): exact too
    added = seg.measure_scales(tiny_core, samples, seg.SegmentRecipe(mlp_host_sum=False))
    assert added[0].ff_out.shape == (hidden,)
    assert check_float(tiny_core, added, seg.layer_segments(tiny_core, BUCKET, added),
                       samples) >= FLOAT_EQUALITY
    one_segments = seg.layer_segments(tiny_core, BUCKET, one)
    feeds = {name: seg.segment_inputs(tiny_core, scales, samples)[(0, "mlp")]
             for name, scales, segments in (("split", split, split_segments),
                                            ("one", one, one_segments))}

    mlp = split_segments[0][1]
    b = torch.from_numpy(feeds["split"][0]["b"])
    with torch.no_grad():
        coarse = gelu_sigmoid(apply_conv(mlp.gate[0], b)) * apply_conv(mlp.up[0], b)
    assert (coarse.abs() > mlp.split).any() and (coarse.abs() <= mlp.split).float().mean() > 0.5

    errors = {}
    for name, segment, scales in (("split", mlp, split), ("one", one_segments[0][1], one)):
        layer_feeds = feeds[name]
        data = quantize_segment("mlp", segment, BUCKET, hidden, layer_feeds)
        check_fully_int8(data)
        ops = [op["op_name"] for op in Interpreter(model_content=data)._get_ops_details()]
        assert "QUANTIZE" not in ops and "DEQUANTIZE" not in ops, ops
        assert ops.count("CONV_2D") == (5 if name == "split" else 3)
        run = SegmentGraph(Interpreter(model_content=data), name)
        out_scale = scales[0].ff_out.reshape(-1, 1, hidden)

        def branch(out: np.ndarray, out_scale: np.ndarray = out_scale) -> np.ndarray:
            # what the host adds to the stream
            return (out.reshape(-1, BUCKET, hidden) * out_scale).sum(0)

        err, ref_norm = 0.0, 0.0
        for feed in layer_feeds:
            with torch.no_grad():
                ref = branch(segment(torch.from_numpy(feed["b"])).numpy())
            err += float(((branch(run(feed["b"])) - ref) ** 2).sum())
            ref_norm += float((ref ** 2).sum())
        errors[name] = (err / ref_norm) ** 0.5
        if name == "split":
            path = tmp_path / "mlp.tflite"
            path.write_bytes(data)
            report = analyze(path)
            assert report.compiles, report.fatal
    assert errors["split"] < errors["one"], errors


