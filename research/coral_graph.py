"""Research: EmbeddingGemma as ONE fully int8 graph shaped for the Edge TPU compiler.

Not what the export ships: the export ships per-layer segments
(``gemma_edge.export.segments``), because as one int8 graph the encoder does not keep
its quality (held-out cosine 0.50, docs/quantization.md). This exists so that the
comparison census in docs/edgetpu.md can be re-run from a checkout::

    python -m research coral-graph --checkpoint DIR --seq-len 256 \
        --out build/coral_256.tflite --placeholder-ranges
    gemma-edge check build/coral_256.tflite

``CoralBucketEncoder`` computes the same function as ``encoder.BucketEncoder``
(same inputs, same L2-normalised output, same ``EncoderCore`` weights; equal in
float to ~1e-6) with only operators that docs/edgetpu.md lists as mappable,
so one full-int8 conversion compiles into a single Edge TPU subgraph:

- activations live as ``[1, 1, T, C]`` (NHWC with H = 1, W = tokens) from the
  first op to the pooling; every token projection (fused q/k/v, o, fused
  gate/up, down, and the Dense head) is a 1x1 ``CONV_2D``. litert-torch emits
  NCHW->NHWC transposes around ``nn.Conv2d``; written as ``permute -> conv ->
  permute`` they cancel and the graph has no ``TRANSPOSE`` at all.
  No ``FULLY_CONNECTED`` with a 2-D output, no ``BATCH_MATMUL``.
- RMSNorm is ``x * rsqrt(mean(x * x) + eps)`` (MUL, MEAN, ADD, RSQRT; no POW /
  SQUARE). The gains of the pre-norms (input, pre-FFN, final) are folded into
  the columns of the next projection (exact: the norm's row scale commutes with
  a per-input-channel weight scale), so those norms carry no constant vector.
- GELU-tanh is ``x * sigmoid(x * (c1 + c2 * x^2))`` with c1 = 2 sqrt(2/pi),
  c2 = 0.044715 c1: the identity 0.5 (1 + tanh(z)) = sigmoid(2 z) turns the tanh
  form into MUL/ADD/LOGISTIC, one op shorter than with TANH, and nothing the
  converter can fuse back into a ``GELU`` builtin.
- Attention scores without a matmul: query rows ``q [1, T*H, 1, D]`` times the
  one KV head ``k [1, 1, T, D]`` broadcast in a MUL to ``[1, T*H, T, D]``,
  reduced by SUM over D. The weighted sum is the same trick,
  ``p [1, T*H, T, 1] * v [1, 1, T, D]`` summed over the key axis. Every tensor
  has at most three dimensions > 1. The products are cut into blocks of query
  rows of at most ``max_product`` elements each (the compiler must keep an op's
  activations on chip), so long buckets get several MUL + SUM pairs per layer.
- Softmax without SOFTMAX (1-D only on Coral) and without EXP (not mappable):
  with ``y = max(s) - s >= 0`` (the max as ``-REDUCE_MIN(-s)``; the quantiser
  has no int8 REDUCE_MAX), ``exp(-y) = sigmoid(-y) / sigmoid(y)`` and the
  division is a square of RSQRT (sigmoid(y) is in [0.5, 1]); the row sum is
  in [1, T], its reciprocal again ``rsqrt(.)^2``. The sign of ``-s`` rides on
  the k-norm gain, so no op computes it. Masking adds ``penalty * (1 - mask)``.
- Pooling is ``SUM_t pool[s, t] * x[t]`` (MUL + SUM over tokens), the Dense
  layers are 1x1 convolutions on ``[1, 1, S, C]``, the L2 norm is
  ``y * rsqrt(max(sum(y * y), 1e-24))``.

``build_coral_graph`` converts one bucket with litert-torch and quantises it
fully to int8 (ai-edge-quantizer static_wi8_ai8, int8 inputs and output), the
form ``gemma-edge check`` / ``compile.mapper.analyze`` and edgetpu_compiler take.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from gemma_edge.export.coral_ops import (
    DEFAULT_MAX_PRODUCT,
    apply_conv,
    conv1x1,
    gelu_sigmoid,
    rms,
    rotate_half,
    row_blocks,
)
from gemma_edge.export.encoder import (
    DEFAULT_MASK_PENALTY,
    EncoderCore,
    EncoderLayer,
    band_bias,
    rope_tables,
)

# The mask penalty of the Edge TPU graph: scores stay within +-35 on EmbeddingGemma, so
# exp(-60) == 0 in any 8-bit softmax while the int8 range of the scores stays usable.
CORAL_MASK_PENALTY = 60.0


class CoralLayer(nn.Module):
    """One EncoderLayer: pre-norm gains folded into the convolutions."""

    def __init__(self, layer: EncoderLayer):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = layer.num_heads, layer.num_kv, layer.head_dim
        self.intermediate = layer.intermediate
        self.eps = layer.input_norm.eps
        g_in = layer.input_norm.gain.detach().double()
        self.qkv = conv1x1(layer.qkv_proj.weight.detach().double() * g_in)
        self.o = conv1x1(layer.o_proj.weight)
        g_ff = layer.pre_ff_norm.gain.detach().double()
        self.gate_up = conv1x1(layer.gate_up_proj.weight.detach().double() * g_ff)
        self.down = conv1x1(layer.down_proj.weight)
        # q gain includes the 1/sqrt(query_pre_attn_scalar) score scale; the k gain is
        # negated so the scores come out as -s (what the REDUCE_MIN softmax wants).
        self.q_gain = nn.Parameter(layer.q_norm.gain.detach().clone(), requires_grad=False)
        self.k_gain = nn.Parameter(-layer.k_norm.gain.detach(), requires_grad=False)
        self.attn_gain = nn.Parameter(layer.post_attn_norm.gain.detach().clone(),
                                      requires_grad=False)
        self.ff_gain = nn.Parameter(layer.post_ff_norm.gain.detach().clone(), requires_grad=False)

    def attention(self, h: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor,
                  cos_k: torch.Tensor, sin_k: torch.Tensor, neg_bias: torch.Tensor,
                  max_product: int) -> torch.Tensor:
        """h [1, 1, T, C] -> attention output before o_proj, [1, 1, T, H*D]."""
        hd, heads, kv = self.head_dim, self.num_heads, self.num_kv
        group = heads // kv
        seq = h.shape[2]
        qkv = apply_conv(self.qkv, h)
        outs = []
        for g in range(kv):
            q = qkv[..., g * group * hd:(g + 1) * group * hd].reshape(1, seq, group, hd)
            q = rms(q, self.eps) * self.q_gain
            q = q * cos_q + rotate_half(q) * sin_q                  # [1, T, G, D]
            k_at = (heads + g) * hd
            k = rms(qkv[..., k_at:k_at + hd], self.eps) * self.k_gain
            k = k * cos_k + rotate_half(k) * sin_k                  # [1, 1, T, D], = -k
            v_at = (heads + kv + g) * hd
            v = qkv[..., v_at:v_at + hd]                             # [1, 1, T, D]
            neg = row_blocks(q.reshape(1, seq * group, 1, hd), k, -1, max_product)
            neg = neg.reshape(1, seq, group, seq) + neg_bias         # [1, T, G, T]
            low = torch.amin(neg, -1, keepdim=True)                  # -max(scores)
            # exp(s - max s) = exp(-y), y = neg - low >= 0: sigmoid(-y) / sigmoid(y)
            r = torch.rsqrt(torch.sigmoid(neg - low))
            e = torch.sigmoid(low - neg) * r * r
            d = torch.rsqrt(e.sum(-1, keepdim=True))                 # row sums in [1, T]
            p = (e * d * d).reshape(1, seq * group, seq, 1)
            o = row_blocks(p, v, 2, max_product)                   # [1, T*G, D]
            outs.append(o.reshape(1, 1, seq, group * hd))
        return outs[0] if kv == 1 else torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], neg_bias: torch.Tensor,
                max_product: int) -> torch.Tensor:
        attn = apply_conv(self.o, self.attention(rms(x, self.eps), *rope, neg_bias, max_product))
        x = x + rms(attn, self.eps) * self.attn_gain
        gate_up = apply_conv(self.gate_up, rms(x, self.eps))
        gate, up = gate_up[..., :self.intermediate], gate_up[..., self.intermediate:]
        act = gelu_sigmoid(gate) * up
        mlp = apply_conv(self.down, act)
        return x + rms(mlp, self.eps) * self.ff_gain


class CoralCore(nn.Module):
    """Conv-shaped weights of every layer, built once from an EncoderCore."""

    def __init__(self, core: EncoderCore):
        super().__init__()
        self.spec = core.spec
        self.layers = nn.ModuleList(CoralLayer(layer) for layer in core.layers)
        self.eps = core.final_norm.eps
        self.dense_has_bias = core.dense_has_bias
        g_f = core.final_norm.gain.detach().double()
        dense = []
        for i, d in enumerate(core.dense):
            w = d.weight.detach().double()
            if i == 0:
                w = w * g_f  # pooling is a sum over tokens: the final gain commutes with it
            dense.append(conv1x1(w, d.bias))
        self.dense = nn.ModuleList(dense)
        self.final_gain = None
        if not dense:
            self.final_gain = nn.Parameter(g_f.float(), requires_grad=False)


class CoralBucketEncoder(nn.Module):
    """BucketEncoder's signature and function, written with Edge TPU-mappable ops only.

    ``core`` is an ``EncoderCore`` (the weights are rearranged once into a
    ``CoralCore``; pass a ``CoralCore`` to share it between buckets).
    """

    def __init__(self, core: EncoderCore | CoralCore, seq_len: int,
                 mask_penalty: float = DEFAULT_MASK_PENALTY, pool_slots: int = 1,
                 max_product: int = DEFAULT_MAX_PRODUCT):
        super().__init__()
        self.core = core if isinstance(core, CoralCore) else CoralCore(core)
        self.max_product = max_product
        self.seq_len = seq_len
        self.mask_penalty = mask_penalty
        self.pool_slots = pool_slots
        spec = self.core.spec
        self.is_sliding = [t == "sliding_attention" for t in spec.layer_types]
        hd, half = spec.head_dim, spec.head_dim // 2
        for name, theta in (("global", spec.rope_theta_global), ("local", spec.rope_theta_local)):
            cos, sin = rope_tables(seq_len, hd, theta)
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half's sign
            self.register_buffer(f"cos_q_{name}", cos.reshape(1, seq_len, 1, hd), persistent=False)
            self.register_buffer(f"sin_q_{name}", sin.reshape(1, seq_len, 1, hd), persistent=False)
            self.register_buffer(f"cos_k_{name}", cos.reshape(1, 1, seq_len, hd), persistent=False)
            self.register_buffer(f"sin_k_{name}", sin.reshape(1, 1, seq_len, hd), persistent=False)
        self.needs_band = any(self.is_sliding) and spec.window_radius < seq_len
        # +penalty outside the sliding window (the scores are negated: -s + penalty)
        self.register_buffer("band", -band_bias(seq_len, spec.window_radius, mask_penalty)
                             .reshape(1, seq_len, 1, seq_len), persistent=False)
        self.embed_scale = spec.embed_scale

    def _rope(self, name: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{k}_{name}") for k in ("cos_q", "sin_q", "cos_k", "sin_k"))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor,
                pool: torch.Tensor) -> torch.Tensor:
        core, seq = self.core, self.seq_len
        x = embeddings.reshape(1, 1, seq, -1) * self.embed_scale
        neg_full = (1.0 - mask.reshape(1, seq, 1, seq)) * self.mask_penalty
        neg_local = neg_full + self.band if self.needs_band else neg_full
        local, glob = self._rope("local"), self._rope("global")
        for layer, sliding in zip(core.layers, self.is_sliding):
            x = layer(x, local if sliding else glob, neg_local if sliding else neg_full,
                      self.max_product)
        x = rms(x, core.eps)
        if core.final_gain is not None:
            x = x * core.final_gain
        slots = pool.shape[1]
        weights = pool.reshape(1, slots, seq, 1)
        pooled = (weights * x).sum(2)                                # [1, S, C]
        if core.dense_has_bias:  # exact mean: 1 / count as rsqrt(count)^2
            inv = torch.rsqrt(torch.clamp(pool.sum(-1, keepdim=True), min=1e-9))
            pooled = pooled * inv * inv
        y = pooled.reshape(1, 1, slots, -1)
        for dense in core.dense:
            y = apply_conv(dense, y)
        norm = torch.rsqrt(torch.clamp((y * y).sum(-1, keepdim=True), min=1e-24))
        return (y * norm).reshape(1, slots, -1)


def synthetic_calibration(seq_len: int, hidden: int, slots: int = 1, count: int = 4,
                          seed: int = 0, row_std: float = 0.03) -> list[dict[str, np.ndarray]]:
    """Random embedding rows with single and packed texts of varying length.

    Enough to give every tensor a range (a structurally correct int8 graph for the
    mapper); representative calibration is ``export.calibration``'s job.
    """
    from gemma_edge.device.packing import bucket_inputs

    rng = np.random.default_rng(seed + seq_len)
    samples = []
    for i in range(count):
        n_texts = 1 if slots == 1 or i % 2 == 0 else min(slots, 2)
        total = int(rng.integers(max(n_texts, seq_len // 4), seq_len + 1))
        cuts = sorted(rng.choice(np.arange(1, total), n_texts - 1, replace=False)) if n_texts > 1 else []
        lengths = np.diff([0, *cuts, total]).tolist()
        mask, pool = bucket_inputs(lengths, seq_len, slots)
        rows = np.zeros((1, seq_len, hidden), np.float32)
        rows[0, :total] = rng.normal(0.0, row_std, (total, hidden))
        samples.append({"embeddings": rows, "mask": mask, "pool": pool})
    return samples


PLACEHOLDER_RANGE = 8.0


def _quantize_placeholder_ranges(content: bytes, signature: str) -> bytes:
    """FULL_INT8 (static_wi8_ai8) with every activation range set to +-PLACEHOLDER_RANGE.

    Same ops, shapes, dtypes and int8 weights as a calibrated graph (weight scales
    come from the weights), so the mapper's census is the same; the numbers it
    computes are meaningless. Calibration (quantize_graph) keeps every intermediate
    float tensor alive: more than 19 GB for EmbeddingGemma at 256 tokens.
    """
    import contextlib
    import io

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer import quantizer, recipe

    from gemma_edge.errors import QuantizationError
    from gemma_edge.export.quantize import model_tensors

    ranges = {}
    for root, t in model_tensors(content):
        buf = root.Buffers(t.Buffer())
        if t.Type() != schema.TensorType.FLOAT32 or buf.DataLength() or buf.Offset() > 1:
            continue  # constants: quantised from their own values
        shape = (1,) * t.ShapeLength()
        ranges[t.Name().decode()] = {"min": np.full(shape, -PLACEHOLDER_RANGE, np.float32),
                                     "max": np.full(shape, PLACEHOLDER_RANGE, np.float32)}
    qt = quantizer.Quantizer(bytearray(content))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return bytes(qt.quantize(ranges, enable_progress_report=False).quantized_model)
    except Exception as exc:  # noqa: BLE001 - ai-edge-quantizer raises many types
        raise QuantizationError(f"ai-edge-quantizer failed for {signature} (full-int8, "
                                f"placeholder ranges): {type(exc).__name__}: {exc}") from exc


def build_coral_graph(core: EncoderCore | CoralCore, seq_len: int, out_path: Path | str,
                      calibration: Optional[Sequence[dict[str, np.ndarray]]] = None,
                      mask_penalty: float = CORAL_MASK_PENALTY, pool_slots: int = 1,
                      max_product: int = DEFAULT_MAX_PRODUCT,
                      placeholder_ranges: bool = False) -> Path:
    """Convert one bucket of the Coral-shaped encoder and quantise it fully to int8.

    ``calibration``: input dicts (``embeddings`` [1, T, H], ``mask`` [1, T, T],
    ``pool`` [1, S, T], float32); ``None`` uses ``synthetic_calibration``.
    Quantisation is ``quantize.quantize_graph`` (FULL_INT8). ``placeholder_ranges``
    skips calibration and gives every activation the range +-8: the structurally
    identical graph for ``gemma-edge check`` at lengths where calibration does not
    fit in memory (EmbeddingGemma at 256 tokens: > 19 GB); not for inference.
    Writes ``out_path`` (signature ``encode_<T>``) atomically and returns it.
    """
    from gemma_edge.atomic_files import atomic_write_bytes
    from gemma_edge.export.convert import convert_buckets, signature_name
    from gemma_edge.export.quantize import Approach, QuantConfig, quantize_graph

    hidden = core.spec.hidden_size
    module = CoralBucketEncoder(core, seq_len, mask_penalty, pool_slots, max_product).eval()
    content = convert_buckets({seq_len: module}, hidden, pool_slots).model_content()
    del module  # the float graph is ~4 bytes per weight: free what is not needed any more
    gc.collect()
    if calibration is None and not placeholder_ranges:
        calibration = synthetic_calibration(seq_len, hidden, pool_slots)
    # static_wi8_ai8 quantises the graph inputs and output too: int8 I/O without
    # QUANTIZE/DEQUANTIZE ops. (quantize.to_int8_io is not needed, and would break the
    # file: its rewriter drops the weights the quantiser stores after the flatbuffer.)
    signature = signature_name(seq_len)
    if placeholder_ranges:
        quantized = _quantize_placeholder_ranges(content, signature)
    else:
        config = QuantConfig(Approach.FULL_INT8)
        quantized = quantize_graph(content, signature, config, list(calibration))
    out_path = Path(out_path)
    atomic_write_bytes(out_path, quantized)
    return out_path


def _run(args: argparse.Namespace) -> int:
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    core, _ = build_encoder(load_checkpoint(args.checkpoint))
    calibration = None
    if args.calibration_artifacts and not args.placeholder_ranges:
        from gemma_edge.export.calibration import calibration_set

        calibration = calibration_set(args.calibration_artifacts, [args.seq_len],
                                      args.calibration_samples)[args.seq_len]
        calibration = [{**s, "pool": s["pool"][:, :args.pool_slots]} for s in calibration]
    path = build_coral_graph(core, args.seq_len, args.out, calibration=calibration,
                             pool_slots=args.pool_slots,
                             placeholder_ranges=args.placeholder_ranges)
    print(f"wrote {path}; map it with: gemma-edge check {path}")
    return 0


def register(sub: Any) -> None:
    """``coral-graph``: one bucket of the single-graph encoder, for ``gemma-edge check``."""
    p = sub.add_parser("coral-graph",
                       help="single-graph Coral-shaped int8 encoder for one bucket "
                            "(comparison census; the export ships per-layer segments)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pool-slots", type=int, default=1)
    p.add_argument("--calibration-artifacts", type=Path, default=None,
                   help="an export whose tokenizer/table turn the corpus into calibration "
                        "inputs (default: synthetic inputs)")
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--placeholder-ranges", action="store_true",
                   help="skip calibration (structure only: for `gemma-edge check` where "
                        "calibration does not fit in memory; not for inference)")
    p.set_defaults(func=_run)
