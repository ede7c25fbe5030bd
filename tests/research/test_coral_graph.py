"""research/coral_graph.py: the single-graph Edge TPU-shaped encoder, same function as
BucketEncoder, ops edgetpu_compiler maps."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gemma_edge.device.packing import bucket_inputs
from gemma_edge.export.checkpoint import load_checkpoint
from gemma_edge.export.encoder import BucketEncoder, EncoderCore, EncoderSpec, build_encoder
from research.coral_graph import (
    CoralBucketEncoder,
    CoralCore,
    build_coral_graph,
    synthetic_calibration,
)


@pytest.fixture(scope="module")
def tiny_core(tiny_checkpoint):
    core, table = build_encoder(load_checkpoint(tiny_checkpoint))
    return core, table


def _inputs(table: torch.Tensor, lengths: list[int], seq_len: int, slots: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = np.zeros((1, seq_len, table.shape[1]), np.float32)
    ids = rng.integers(4, table.shape[0], sum(lengths))
    rows[0, :len(ids)] = table[torch.from_numpy(ids)].numpy()
    mask, pool = bucket_inputs(lengths, seq_len, slots)
    return torch.from_numpy(rows), torch.from_numpy(mask), torch.from_numpy(pool)


def _cosines(ref: torch.nn.Module, ours: torch.nn.Module, args, texts: int) -> np.ndarray:
    with torch.no_grad():
        a, b = ref(*args)[0, :texts], ours(*args)[0, :texts]
    return (a * b).sum(-1).numpy()


@pytest.mark.parametrize("seq_len,lengths,slots,max_product", [
    (16, [16], 1, 1 << 20),           # one text filling the bucket
    (32, [9], 1, 1 << 20),            # padding
    (64, [40, 7, 12], 4, 1 << 20),    # packed texts, longer than the sliding window
    (64, [64], 1, 3000),              # attention products cut into many row blocks
])
def test_float_equal_to_bucket_encoder(tiny_core, seq_len, lengths, slots, max_product):
    core, table = tiny_core
    ref = BucketEncoder(core, seq_len).eval()
    ours = CoralBucketEncoder(core, seq_len, pool_slots=slots, max_product=max_product).eval()
    cos = _cosines(ref, ours, _inputs(table, lengths, seq_len, slots), len(lengths))
    assert cos.min() >= 0.99999, cos


def test_grouped_query_attention_and_dense_bias():
    """num_kv_heads > 1 and Dense biases (not EmbeddingGemma's, but the spec allows them)."""
    torch.manual_seed(0)
    hidden, heads, kv, hd, inter = 32, 4, 2, 8, 48
    spec = EncoderSpec(hidden, inter, 2, heads, kv, hd, ("sliding_attention", "full_attention"),
                       3, 1e6, 1e4, 1e-6, float(hd), 100)
    sd = {"norm.weight": torch.randn(hidden) * 0.3}
    shapes = {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
              "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden,
             "pre_feedforward_layernorm": hidden, "post_feedforward_layernorm": hidden,
             "self_attn.q_norm": hd, "self_attn.k_norm": hd}
    for i in range(2):
        for name, shape in shapes.items():
            sd[f"layers.{i}.{name}.weight"] = torch.randn(shape) * 0.2
        for name, size in norms.items():
            sd[f"layers.{i}.{name}.weight"] = torch.randn(size) * 0.3
    dense = [SimpleNamespace(weight=torch.randn(40, hidden) * 0.2, bias=torch.randn(40) * 0.1)]
    core = EncoderCore(spec, sd, dense).eval()
    table = torch.randn(100, hidden)
    args = _inputs(table, [5, 9], 16, 2)
    cos = _cosines(BucketEncoder(core, 16).eval(),
                   CoralBucketEncoder(core, 16, pool_slots=2, max_product=200).eval(), args, 2)
    assert cos.min() >= 0.99999, cos


@pytest.mark.slow
def test_full_int8_graph_maps_on_the_edge_tpu(tiny_core, tmp_path):
    from gemma_edge.compile.mapper import analyze
    from gemma_edge.export.quantize import tensor_dtype_census

    core, table = tiny_core
    seq_len = 32
    calibration = synthetic_calibration(seq_len, core.spec.hidden_size, count=3, row_std=0.5)
    path = build_coral_graph(CoralCore(core), seq_len, tmp_path / "coral_32.tflite", calibration)
    census = tensor_dtype_census(path.read_bytes())
    assert set(census) <= {"INT8", "INT32"}, census  # int8 activations and I/O, int32 biases

    report = analyze(path)
    assert report.compiles, report.fatal
    graph = report.to_json()["graphs"][0]
    ops = Counter(o["op"] for o in graph["operators"])
    for banned in ("GELU", "BATCH_MATMUL", "SOFTMAX", "FULLY_CONNECTED", "TRANSPOSE", "EXP",
                   "DIV", "POW", "SQUARE", "QUANTIZE", "DEQUANTIZE"):
        assert banned not in ops, (banned, ops)
    assert ops["CONV_2D"] == 4 * core.spec.num_layers + len(core.dense)
    assert graph["cut"] is None and graph["tpu_subgraphs"] == 1, graph["cut"]
    assert graph["mac_share"] >= 0.99 and graph["op_share"] == 1.0
    for op in graph["operators"]:  # <= 3 innermost dims > 1 everywhere
        for shape in op["inputs"] + op["outputs"]:
            dims = [int(d) for d in shape[shape.index("[") + 1:shape.index("]")].split(",") if d]
            assert sum(d > 1 for d in dims) <= 3, (op["op"], shape)

    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner(f"encode_{seq_len}")
    details = runner.get_input_details()
    feed = {}
    args = _inputs(table, [20], seq_len, 1, seed=3)
    for name, value in zip(("embeddings", "mask", "pool"), args):
        scale, zero = details[name]["quantization"]
        q = np.clip(np.round(value.numpy() / scale) + zero, -128, 127)
        feed[name] = q.astype(np.int8)
    out = runner(**feed)["embedding"]  # the file loads and runs (int8 numerics: not here)
    assert out.dtype == np.int8 and out.shape == (1, 1, core.dense[-1].out_features)


@pytest.mark.slow
def test_coral_graph_cli_then_check(tiny_checkpoint, tmp_path, capsys):
    from gemma_edge.cli import main
    from research.cli import main as research

    out = tmp_path / "coral_16.tflite"
    assert research(["coral-graph", "--checkpoint", str(tiny_checkpoint), "--seq-len", "16",
                 "--out", str(out)]) == 0
    assert main(["check", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):])
    graph = report["graphs"][0]
    assert graph["mac_share"] == 1.0 and graph["cpu_ops"] == 0
