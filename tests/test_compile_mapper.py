"""Edge TPU pre-flight on tiny graphs built here: one mappable and one unmappable case per rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.edgetpu.tflite_builder import GraphBuilder, fc_model

from gemma_edge.compile import rules
from gemma_edge.compile.estimate import Assumptions, estimate_latency
from gemma_edge.compile.mapper import analyze
from gemma_edge.errors import InputError


def _unary(tmp_path: Path, op: str, shape_in: list, shape_out: list = None, dtype: str = "int8",
           version: int = 1, options: tuple = None, extra_inputs: tuple = (),
           signature: list = None) -> Path:
    """One op: x -> op(x, *extra_inputs) -> y."""
    b = GraphBuilder()
    x = b.tensor(shape_in, dtype, name="x", signature=signature)
    extras = [b.const(np.asarray(v), "int32") for v in extra_inputs]
    y = b.tensor(shape_out or shape_in, dtype, name="y")
    b.op(op, [x, *extras], [y], version=version, options=options)
    return b.save(tmp_path / f"{op.lower()}.tflite", [x], [y])


def _only(path: Path, **kwargs):
    report = analyze(path, **kwargs)
    assert len(report.graphs) == 1
    return report, report.graphs[0].ops[0]


# -- model-level: the compiler refuses the whole model ---------------------------------
def test_known_op_version_compiles(tmp_path: Path) -> None:
    report, op = _only(fc_model(tmp_path / "fc.tflite", version=9))
    assert report.compiles and op.mapped


def test_op_version_newer_than_compiler_is_fatal(tmp_path: Path) -> None:
    report, _ = _only(fc_model(tmp_path / "fc.tflite", version=12))
    assert not report.compiles
    assert report.fatal == ["Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'"]


def test_gelu_is_unknown_to_compiler_16(tmp_path: Path) -> None:
    report, op = _only(_unary(tmp_path, "GELU", [1, 8]))
    assert not report.compiles and "'GELU' version '1'" in report.fatal[0]
    assert not op.mapped and op.status == rules.NOT_SUPPORTED


def test_float_graph_is_not_quantized(tmp_path: Path) -> None:
    report, op = _only(_unary(tmp_path, "TANH", [1, 8], dtype="float32"))
    assert not report.compiles and report.fatal[0].startswith("Model not quantized")
    assert op.status == rules.BAD_DTYPE


# -- per-tensor requirements -------------------------------------------------------------
def test_int8_add_maps(tmp_path: Path) -> None:
    b = GraphBuilder()
    x, z = b.tensor([1, 4, 8]), b.tensor([1, 4, 8])
    y = b.tensor([1, 4, 8])
    b.op("ADD", [x, z], [y])
    _, op = _only(b.save(tmp_path / "add.tflite", [x, z], [y]))
    assert op.mapped and op.status == rules.MAPPED and op.reason == ""


def test_int16_activations_do_not_map(tmp_path: Path) -> None:
    _, op = _only(_unary(tmp_path, "TANH", [1, 8], dtype="int16"))
    assert not op.mapped and op.status == rules.BAD_DTYPE and "int16" in op.reason


def test_three_innermost_dimensions(tmp_path: Path) -> None:
    _, ok = _only(_unary(tmp_path, "TANH", [1, 2, 3, 4]))
    _, bad = _only(_unary(tmp_path, "LOGISTIC", [2, 2, 3, 4]))
    assert ok.mapped
    assert not bad.mapped and bad.status == rules.BAD_RANK


def test_dynamic_shape_does_not_map(tmp_path: Path) -> None:
    _, ok = _only(_unary(tmp_path, "TANH", [1, 8], signature=[1, 8]))
    _, bad = _only(_unary(tmp_path, "LOGISTIC", [1, 8], signature=[-1, 8]))
    assert ok.mapped
    assert not bad.mapped and "dynamic shape" in bad.reason


# -- per-op limits ------------------------------------------------------------------------
def test_fully_connected_output_must_be_one_dimensional(tmp_path: Path) -> None:
    _, ok = _only(fc_model(tmp_path / "one.tflite", tokens=1))
    _, bad = _only(fc_model(tmp_path / "seq.tflite", tokens=4))
    assert ok.mapped and ok.macs == 8 * 16
    assert not bad.mapped and bad.status == rules.UNSPECIFIED
    assert "not one-dimensional" in bad.reason and bad.source.startswith(rules.OPS_DOC)


def test_fully_connected_weights_must_be_constant(tmp_path: Path) -> None:
    b = GraphBuilder()
    x, w = b.tensor([1, 16], name="x"), b.tensor([8, 16], name="w")
    y = b.tensor([1, 8])
    b.op("FULLY_CONNECTED", [x, w, -1], [y])
    _, op = _only(b.save(tmp_path / "fc_act.tflite", [x, w], [y]))
    assert not op.mapped and "not a compile-time constant" in op.reason


def test_batch_matmul_is_not_supported(tmp_path: Path) -> None:
    b = GraphBuilder()
    q, k = b.tensor([1, 4, 8]), b.tensor([1, 8, 4])
    s = b.tensor([1, 4, 4])
    b.op("BATCH_MATMUL", [q, k], [s], options=("BatchMatMulOptions", {"adjX": False}))
    _, op = _only(b.save(tmp_path / "bmm.tflite", [q, k], [s]))
    assert not op.mapped and op.status == rules.NOT_SUPPORTED
    assert op.macs == 4 * 4 * 8


@pytest.mark.parametrize("shape,mapped", [([1, 100], True), ([1, 4, 100], False),
                                          ([1, 20000], False)])
def test_softmax_one_dimensional_up_to_16000(tmp_path: Path, shape: list, mapped: bool) -> None:
    _, op = _only(_unary(tmp_path, "SOFTMAX", shape))
    assert op.mapped is mapped


def test_min_runtime_version(tmp_path: Path) -> None:
    path = _unary(tmp_path, "RSQRT", [1, 8])
    _, ok = _only(path, min_runtime=14)
    _, bad = _only(path, min_runtime=13)
    assert ok.mapped
    assert not bad.mapped and "runtime 14+" in bad.reason


@pytest.mark.parametrize("strides,mapped", [([1, 1], True), ([1, 2], False)])
def test_strided_slice_strides(tmp_path: Path, strides: list, mapped: bool) -> None:
    path = _unary(tmp_path, "STRIDED_SLICE", [1, 8], [1, 8 // strides[1]],
                  extra_inputs=([0, 0], [1, 8], strides),
                  options=("StridedSliceOptions", {"ellipsisMask": 0}))
    assert _only(path)[1].mapped is mapped


@pytest.mark.parametrize("axis,mapped", [(2, True), (0, False)])
def test_mean_axes(tmp_path: Path, axis: int, mapped: bool) -> None:
    out = [1, 4, 1] if axis == 2 else [1, 4, 8]
    path = _unary(tmp_path, "MEAN", [1, 4, 8], out, extra_inputs=([axis],),
                  options=("ReducerOptions", {"keepDims": True}))
    assert _only(path)[1].mapped is mapped


@pytest.mark.parametrize("fill,mapped", [(0, True), (3, False)])
def test_concatenation_constant_input_must_be_zero_padding(tmp_path: Path, fill: int,
                                                           mapped: bool) -> None:
    b = GraphBuilder()
    x = b.tensor([1, 4, 8])
    pad = b.const(np.full((1, 4, 2), fill), "int8")
    y = b.tensor([1, 4, 10])
    b.op("CONCATENATION", [x, pad], [y], options=("ConcatenationOptions", {"axis": 2}))
    assert _only(b.save(tmp_path / "cat.tflite", [x], [y]))[1].mapped is mapped


@pytest.mark.parametrize("dilation,mapped", [((2, 2), True), ((1, 2), False)])
def test_conv_same_dilation(tmp_path: Path, dilation: tuple, mapped: bool) -> None:
    b = GraphBuilder()
    x = b.tensor([1, 8, 8, 4])
    w = b.const(np.ones((6, 3, 3, 4)), "int8")
    bias = b.const(np.zeros(6), "int32")
    y = b.tensor([1, 8, 8, 6])
    b.op("CONV_2D", [x, w, bias], [y], version=3,
         options=("Conv2DOptions", {"dilationWFactor": dilation[0],
                                    "dilationHFactor": dilation[1]}))
    _, op = _only(b.save(tmp_path / "conv.tflite", [x], [y]))
    assert op.mapped is mapped
    assert op.macs == 8 * 8 * 6 * 3 * 3 * 4 and op.param_bytes == 6 * 9 * 4 + 6 * 4


def test_unlisted_op_is_not_supported(tmp_path: Path) -> None:
    _, ok = _only(_unary(tmp_path, "TANH", [1, 8]))
    _, bad = _only(_unary(tmp_path, "EXP", [1, 8]))
    assert ok.mapped and not bad.mapped and bad.status == rules.NOT_SUPPORTED


def test_quantize_from_float_stays_on_cpu(tmp_path: Path) -> None:
    b = GraphBuilder()
    x = b.tensor([1, 8], "float32")
    q = b.tensor([1, 8])
    r = b.tensor([1, 8], scale=0.1)
    b.op("QUANTIZE", [x], [q])
    b.op("QUANTIZE", [q], [r])
    report = analyze(b.save(tmp_path / "q.tflite", [x], [r]))
    first, second = report.graphs[0].ops
    assert not first.mapped and first.status == rules.UNSPECIFIED
    assert second.mapped and report.compiles


# -- the cut ----------------------------------------------------------------------------
def _chain(tmp_path: Path) -> Path:
    """QUANTIZE(float) -> TANH -> BATCH_MATMUL -> TANH -> DEQUANTIZE."""
    b = GraphBuilder()
    x = b.tensor([1, 4, 4], "float32")
    t = [b.tensor([1, 4, 4]) for _ in range(4)]
    y = b.tensor([1, 4, 4], "float32")
    b.op("QUANTIZE", [x], [t[0]])
    b.op("TANH", [t[0]], [t[1]])
    b.op("BATCH_MATMUL", [t[1], t[1]], [t[2]])
    b.op("TANH", [t[2]], [t[3]])
    b.op("DEQUANTIZE", [t[3]], [y])
    return b.save(tmp_path / "chain.tflite", [x], [y])


def test_cut_at_first_unmappable_op_after_the_start(tmp_path: Path) -> None:
    g = analyze(_chain(tmp_path)).graphs[0]
    where = [o.mapped for o in g.ops]
    assert where == [False, True, False, False, False]
    assert g.cut == {"index": 2, "op": "BATCH_MATMUL", "reason": g.ops[2].reason}
    assert g.ops[3].status == rules.AFTER_CUT  # a TANH after the cut stays on the CPU
    assert g.ops[0].status == rules.UNSPECIFIED  # the input QUANTIZE runs before, no cut
    assert g.tpu_subgraphs == 1
    summary = g.to_json()
    assert summary["tpu_ops"] == 1 and summary["cpu_ops"] == 4 and summary["op_share"] == 0.2


def test_multiple_subgraphs_maps_past_the_cut(tmp_path: Path) -> None:
    g = analyze(_chain(tmp_path), multiple_subgraphs=True).graphs[0]
    assert [o.mapped for o in g.ops] == [False, True, False, True, False]
    assert g.cut is None and g.tpu_subgraphs == 2
    # both TANH subgraphs read from / write to the CPU: 4 tensors of 16 int8 values
    assert g.io_bytes == 4 * 16


# -- memory and latency -------------------------------------------------------------------
def test_parameters_cached_then_streamed(tmp_path: Path) -> None:
    b = GraphBuilder()
    x = b.tensor([1, 64])
    h = b.tensor([1, 64])
    y = b.tensor([1, 64])
    w1, w2 = b.const(np.ones((64, 64)), "int8"), b.const(np.ones((64, 64)), "int8")
    b.op("FULLY_CONNECTED", [x, w1, -1], [h])
    b.op("FULLY_CONNECTED", [h, w2, -1], [y])
    path = b.save(tmp_path / "mlp.tflite", [x], [y])
    g = analyze(path, assumptions=Assumptions(param_cache_bytes=5000)).graphs[0]
    assert (g.param_bytes, g.cached_bytes, g.streamed_bytes) == (8192, 4096, 4096)
    g = analyze(path).graphs[0]
    assert (g.cached_bytes, g.streamed_bytes) == (8192, 0)


def test_latency_is_bound_by_streamed_bytes() -> None:
    a = Assumptions()
    usb = estimate_latency(a, "usb", "max", tpu_macs=0, cpu_macs=0, cached_bytes=0,
                           streamed_bytes=100 * 10**6, io_bytes=0, tpu_subgraphs=1)
    assert usb.bound == "stream"
    assert usb.stream_s == pytest.approx(100e6 / a.target("usb").link_bytes_per_s)
    assert usb.total_s == pytest.approx(usb.stream_s + a.target("usb").invoke_overhead_s)
    std = estimate_latency(a, "pcie", "std", tpu_macs=10**9, cpu_macs=0, cached_bytes=0,
                           streamed_bytes=0, io_bytes=0, tpu_subgraphs=1)
    fast = dataclasses.replace(std, clock="max")
    assert std.bound == "compute"
    assert std.compute_s == pytest.approx(2e9 / (4e12 * 0.5 * a.utilization))
    assert fast.clock == "max"


def test_report_json_and_table(tmp_path: Path) -> None:
    report = analyze(_chain(tmp_path))
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["compiles"] and doc["compiler_version"] == rules.COMPILER_VERSION
    assert {e["target"] for e in doc["graphs"][0]["estimates"]} == {"usb", "pcie", "devboard"}
    assert doc["assumptions"]["param_cache_bytes"] == Assumptions().param_cache_bytes
    table = report.format_table(target="usb", clock="max")
    assert "BATCH_MATMUL" in table and "cut: op 2" in table
    assert "pcie" not in table.split("bound")[-1]


def test_not_a_tflite_file(tmp_path: Path) -> None:
    bogus = tmp_path / "model.tflite"
    bogus.write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="not a TFLite flatbuffer"):
        analyze(bogus)
