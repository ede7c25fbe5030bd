"""Fully int8 Edge TPU graph: mechanics on the tiny random model (no real checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("litert_torch")

BUCKET = 32


@pytest.fixture(scope="module")
def tiny_core(tiny_checkpoint: Path):
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    core, _ = build_encoder(load_checkpoint(tiny_checkpoint))
    return core


@pytest.fixture(scope="module")
def calibration(tiny_artifacts: Path):
    from gemma_edge.export.calibration import calibration_set

    return calibration_set(tiny_artifacts, [BUCKET], 6)


@pytest.fixture(scope="module")
def built(tiny_core, tiny_artifacts: Path, calibration, tmp_path_factory):
    from gemma_edge.export.full_int8 import build_full_int8

    out = tmp_path_factory.mktemp("full-int8")
    entries = build_full_int8(tiny_core, tiny_artifacts, [BUCKET], out, calibration=calibration)
    return out, entries


def _args(sample):
    return [torch.from_numpy(sample[k]) for k in ("embeddings", "mask", "pool")]


def test_rewrite_is_exact_in_float(tiny_core, calibration):
    from gemma_edge.export.encoder import BucketEncoder
    from gemma_edge.export.int8_encoder import Int8BucketEncoder, build_int8_core

    icore = build_int8_core(tiny_core, calibration[BUCKET][:3])
    assert not torch.allclose(icore.stream_scale, torch.ones_like(icore.stream_scale))
    ref = BucketEncoder(tiny_core, BUCKET).eval()
    new = Int8BucketEncoder(icore, BUCKET).eval()
    with torch.no_grad():
        for sample in calibration[BUCKET]:
            args = _args(sample)
            live = args[2][0].sum(-1) > 0
            a, b = ref(*args)[0][live], new(*args)[0][live]
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            assert float(cos.min()) >= 0.99999
            assert torch.allclose(b.norm(dim=-1), torch.ones(int(live.sum())), atol=1e-3)


def test_rewrite_check_catches_a_wrong_rewrite(tiny_core, calibration):
    from gemma_edge.errors import QuantizationError
    from gemma_edge.export.full_int8 import check_rewrite
    from gemma_edge.export.int8_encoder import Int8BucketEncoder, build_int8_core

    icore = build_int8_core(tiny_core, calibration[BUCKET][:2])
    with torch.no_grad():
        icore.layers[0].q_proj.weight.mul_(3.0).add_(0.1)
    with pytest.raises(QuantizationError):
        check_rewrite(tiny_core, Int8BucketEncoder(icore, BUCKET).eval(), calibration[BUCKET])


def test_graph_is_fully_int8_with_int8_io(built):
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    from gemma_edge.export.quantize import tensor_dtype_census

    out, entries = built
    assert [e["path"] for e in entries] == [f"encoder_edgetpu_{BUCKET}.tflite"]
    entry = entries[0]
    assert entry["role"] == "edgetpu" and entry["approach"] == "full-int8"
    assert entry["seq_lens"] == [BUCKET] and entry["pool_slots"] == 4
    data = (out / entry["path"]).read_bytes()
    census = tensor_dtype_census(data)
    assert set(census) <= {"INT8", "INT32"} and census.get("INT8", 0) > 0, census
    tree = fbu.read_model_from_bytearray(bytearray(data))
    codes = {fbu.get_builtin_code_from_operator_code(c) for c in tree.operatorCodes}
    assert schema.BuiltinOperator.DEQUANTIZE not in codes
    sub = tree.subgraphs[0]
    for index in list(sub.inputs) + list(sub.outputs):
        assert sub.tensors[index].type == schema.TensorType.INT8
    for tensor in sub.tensors:  # every quantised tensor has sane scales
        q = tensor.quantization
        if q is not None and q.scale is not None and len(q.scale):
            scale = np.asarray(q.scale, dtype=np.float64)
            assert np.all(np.isfinite(scale)) and np.all(scale > 0), tensor.name


def test_int8_graph_runs_through_graph_runner(built, calibration):
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.device.runtime import GraphRunner

    out, entries = built
    interp = Interpreter(model_path=str(out / entries[0]["path"]), num_threads=2)
    runner = GraphRunner(interp, entries[0]["signatures"][str(BUCKET)], BUCKET, 96, 4)
    for detail in runner.input_details:
        assert np.dtype(detail["dtype"]) == np.int8
        scale, _ = detail["quantization"]
        assert np.isfinite(scale) and scale > 0
    for sample in calibration[BUCKET][:3]:
        result = runner.run(sample["embeddings"], sample["mask"], sample["pool"])
        live = sample["pool"][0].sum(-1) > 0
        assert result.shape[0] == 4 and result.shape[1] > 0
        assert np.all(np.isfinite(result))
        norms = np.linalg.norm(result[live], axis=-1)
        # int8 output (step ~1/127 of the largest element): unit length within 10 %
        assert np.all(np.abs(norms - 1.0) < 0.1), norms


def test_boundary_rewrite_keeps_the_function(tiny_core, calibration, tmp_path):
    """int8_boundary on a quantised graph: same outputs as the float-I/O graph."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.device.runtime import GraphRunner
    from gemma_edge.export.convert import convert_buckets, signature_name
    from gemma_edge.export.full_int8 import _exported_bytes, int8_boundary, quantize_static
    from gemma_edge.export.int8_encoder import Int8BucketEncoder, build_int8_core

    icore = build_int8_core(tiny_core, calibration[BUCKET][:2])
    module = Int8BucketEncoder(icore, BUCKET).eval()
    fbytes = _exported_bytes(convert_buckets({BUCKET: module}, 96, 4))
    qfloat_io = quantize_static(fbytes, signature_name(BUCKET), calibration[BUCKET])
    (tmp_path / "a.tflite").write_bytes(qfloat_io)
    (tmp_path / "b.tflite").write_bytes(int8_boundary(qfloat_io))
    runners = [GraphRunner(Interpreter(model_path=str(tmp_path / n)), signature_name(BUCKET),
                           BUCKET, 96, 4) for n in ("a.tflite", "b.tflite")]
    # ai-edge-quantizer 0.10 may already give int8 I/O; after the rewrite all I/O is int8
    assert all(np.dtype(d["dtype"]) == np.int8 for d in runners[1].input_details)
    assert np.dtype(runners[1]._out_detail["dtype"]) == np.int8
    sample = calibration[BUCKET][0]
    a, b = (r.run(sample["embeddings"], sample["mask"], sample["pool"]) for r in runners)
    np.testing.assert_allclose(a, b, atol=0.02)
