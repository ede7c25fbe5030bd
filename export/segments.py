"""The segmented full-int8 encoder: per-layer int8 graphs, residual stream on the host.

Why segments: a single fully int8 graph must carry the residual stream in int8
with one scale per tensor. On EmbeddingGemma that stream reaches 1e2-1e5 in a
few channels (sqrt(768)-scaled embeddings, large post-norm gains), and every
experiment with it in int8 lost the model (held-out cosine 0.50, see
docs/quantization.md). Here each layer is two graphs, both fully int8 (int8
inputs, activations, weights and outputs, Edge TPU-mappable ops only):

    attention segment  a [1, 1, T, C] int8, mask [1, T, T] int8 -> o [1, 1, T, C] int8
    MLP segment        b [1, 1, T, C] int8                      -> m [1, 2, T, C] int8

and the host does what 8 bits cannot: the residual adds and the four RMSNorms
of each layer in float32 (a few vector ops per token), the pooling, the Dense
head and the L2 norm. Every encoder weight is in the segments (99.7 % of the MACs
at 256 tokens; only the Dense head runs on the host); on a Coral board each segment
is one Edge TPU call.

Exact rewrites that make per-tensor int8 work, all folded into weights or into
host-side per-channel vectors (checked equal in float by ``check_float``):

- segment inputs are ``rms(x) / s``: the pre-norm gain and a SmoothQuant
  per-channel scale ``s = A^alpha / W^(1 - alpha)`` go into the weight columns;
- segment outputs are divided per channel by their calibrated absmax (weight
  rows), the host multiplies back before its RMSNorm: per-channel output scales
  for free;
- V and the GELU product get SmoothQuant scales folded between v/o and up/down;
- q, k, v and gate, up are separate 1x1 convolutions: one output scale each;
- q and k are carried divided by their channel absmax ``u``; their RMSNorm's
  mean square is a 1x1 convolution of ``(q/u)^2`` with weights ``u^2 / D``
  (squaring raw q in int8 rounded most squares to 0);
- softmax without a mask penalty in any int8 tensor: the row max is taken over
  ``scores * mask`` and masking multiplies ``exp(max - s)`` by the 0/1 mask;
  normalisation is split as ``(sum_j (e_j / sqrt(S)) v_j) / sqrt(S)`` so the
  probabilities keep more than the 1/256 of an int8 softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from gemma_edge.errors import QuantizationError

from .coral_ops import (
    DEFAULT_MAX_PRODUCT,
    apply_conv,
    conv1x1,
    exp_neg,
    gelu_sigmoid,
    rotate_half,
    row_blocks,
)
from .encoder import BucketEncoder, EncoderCore, EncoderLayer, band_bias, rope_tables


@dataclass
class LayerScales:
    """Per-channel vectors of one layer (float32 numpy), shared by every bucket."""

    attn_in: np.ndarray   # [C] segment input = rms(x) / attn_in
    v: np.ndarray         # [D] V channel d is divided by v[d] (o_proj columns multiplied)
    attn_out: np.ndarray  # [C] o_proj output channel c is divided by attn_out[c]
    ff_in: np.ndarray     # [C]
    act: np.ndarray       # [I] GELU(gate) * up channel j is divided by act[j]
    ff_out: np.ndarray    # [C], or [G, C]: the MLP segment returns G partials (host sums)
    q: np.ndarray         # [H*D] raw q channel absmax: the graph carries q / q_scale
    k: np.ndarray         # [D]
    # GELU(gate) * up / act carried as two int8 tensors (Smoothing.mlp_split): a fine one
    # that saturates at act_split and the excess beyond it; 0: one tensor
    act_split: float = 0.0
    # exp(-y) of the softmax carried as two int8 tensors (Smoothing.softmax_split): a fine
    # one, min(exp(-y) / softmax_split, 1), and the excess of exp(-y) beyond softmax_split;
    # 0: one tensor
    softmax_split: float = 0.0
    # the smallest bucket (tokens) whose attention segments use softmax_split
    softmax_split_from: int = 0

    @staticmethod
    def identity(c: int, d: int, i: int, heads: int = 1) -> LayerScales:
        one = np.ones
        return LayerScales(one(c, np.float32), one(d, np.float32), one(c, np.float32),
                           one(c, np.float32), one(i, np.float32), one(c, np.float32),
                           one(heads * d, np.float32), one(d, np.float32))


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant migration strengths per place (0: none, 1: all into the weights).

    Chosen on the corpus at 128 tokens (docs/quantization.md): the MLP wants less
    migration than the attention input. With the two-range GELU product (mlp_split)
    the product needs less of its range moved into up_proj: act 0.45 instead of 0.6
    (64 tokens, both segment kinds: 0.9905 vs 0.9888 mean cosine, 24 texts).
    """

    attn_in: float = 0.75
    v: float = 0.75
    ff_in: float = 0.6
    act: float = 0.45
    # Where the MLP's partial down projections (the two ranges of mlp_split) are added:
    # in the graph (an int8 ADD, one per-tensor scale for the sum) or on the host in
    # float, the segment returning the partials [1, 2, T, C], each with its own
    # per-channel output scale. Measured (64 tokens, both kinds, 24 texts): 0.9913 /
    # 0.9845 against 0.9905 / 0.9835 with the ADD, for one more [T, C] int8 output per
    # MLP call.
    mlp_host_sum: bool = True
    # Two-range GELU product: the MUL is computed twice, once saturating at this fraction
    # of the product's calibrated absmax (fine steps for the bulk of the values) and once
    # at full range, from which only the part beyond the saturation level is kept (exact
    # zero elsewhere); down_proj runs on both and the two partials are added. Per-tensor
    # int8 gives the rare large products (set by a few tokens) and the common small ones
    # the same step; this gives the common ones 1/mlp_split finer steps. 0: one tensor.
    # Measured in docs/quantization.md.
    mlp_split: float = 0.125
    # Two-range softmax weights: exp(max - s) is in (0, 1] with its int8 steps of 1/255 set
    # by the row maximum, and most of a row's weights are small. With this fraction r > 0
    # the segment also computes min(exp(-y) / r, 1) = exp(-relu(y - ln(1/r))) (its own
    # LOGISTIC chain: 1/r finer steps for the small weights) and keeps of the coarse
    # exp(-y) only its excess beyond r (exact zero below); both weight v and the row sum.
    # 0: one tensor. The p*v products are rounded to int8 one by one before their sum
    # over the row, and the more keys a row has, the more of its weight is small.
    # Measured (attention segments only, 24 corpus texts held back from the calibration,
    # `segment-study --eval-texts corpus`, mean / min cosine): 256 tokens 0.9957 / 0.9923
    # with r = 1/8 against 0.9911 / 0.9827 with one tensor; 64 tokens 0.9850 / 0.9705
    # against 0.9844 / 0.9693. softmax_split_from: the smallest bucket (tokens) that uses
    # it (0: all), for trading the extra attention ops back in small buckets.
    softmax_split: float = 0.125
    softmax_split_from: int = 0

    def to_json(self) -> dict[str, float]:
        # "mlp_groups": a format field of the manifest (MLP channel groups, a study that
        # lost: docs/quantization.md); the shipped recipe has one group
        return {"attn_in": self.attn_in, "v": self.v, "ff_in": self.ff_in, "act": self.act,
                "mlp_groups": 1, "mlp_host_sum": self.mlp_host_sum,
                "mlp_split": self.mlp_split, "softmax_split": self.softmax_split,
                "softmax_split_from": self.softmax_split_from}


def smooth(act_absmax: torch.Tensor, weight_colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's migration scale s = A^alpha / W^(1 - alpha) (activation /= s)."""
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_colmax.double().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).float()


def _t(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(v, np.float32)).double()


class AttentionSegment(nn.Module):
    """One layer's attention branch: rms-normalised input -> o_proj output (Coral ops)."""

    def __init__(self, layer: EncoderLayer, seq_len: int, sliding: bool, window_radius: int,
                 rope_theta: float, scales: LayerScales, max_product: int = DEFAULT_MAX_PRODUCT):
        super().__init__()
        hd, heads, kv = layer.head_dim, layer.num_heads, layer.num_kv
        if kv != 1:
            raise ValueError("the segmented encoder supports one KV head (EmbeddingGemma)")
        self.heads, self.hd, self.seq_len, self.max_product = heads, hd, seq_len, max_product
        self.eps = layer.input_norm.eps
        col = layer.input_norm.gain.detach().double() * _t(scales.attn_in)
        w_qkv = layer.qkv_proj.weight.detach().double() * col
        inv_v = 1.0 / _t(scales.v)
        u_q, u_k = _t(scales.q), _t(scales.k)
        self.q = conv1x1(w_qkv[:heads * hd] / u_q[:, None])
        self.k = conv1x1(w_qkv[heads * hd:(heads + 1) * hd] / u_k[:, None])
        self.v = conv1x1(w_qkv[(heads + 1) * hd:] * inv_v[:, None])
        # q/k RMSNorm of channel-equalised q' = q / u: mean(q^2) = sum_d (u_d^2 / D) q'_d^2,
        # a 1x1 convolution (block-diagonal over heads) instead of MUL + MEAN on raw q:
        # squaring raw q in int8 (range +-60, per-token rms 4..14) rounded most squares
        # to 0 (attention segment error 0.12 -> 0.44 in simulation).
        w_ms = torch.zeros(heads, heads * hd, dtype=torch.float64)
        for h in range(heads):
            w_ms[h, h * hd:(h + 1) * hd] = u_q[h * hd:(h + 1) * hd] ** 2 / hd
        self.q_ms = conv1x1(w_ms, torch.full((heads,), self.eps, dtype=torch.float64))
        self.k_ms = conv1x1((u_k ** 2 / hd)[None, :], torch.full((1,), self.eps, dtype=torch.float64))
        w_o = layer.o_proj.weight.detach().double() * _t(scales.v).repeat(heads)
        self.o = conv1x1(w_o / _t(scales.attn_out)[:, None])
        # the k gain is negated: scores come out as -s, the softmax takes REDUCE_MIN
        # (ai-edge-quantizer has no int8 REDUCE_MAX), as in coral_encoder.
        self.q_gain = nn.Parameter((layer.q_norm.gain.detach().double().repeat(heads) * u_q)
                                   .float().reshape(1, 1, heads, hd), requires_grad=False)
        self.k_gain = nn.Parameter((-layer.k_norm.gain.detach().double() * u_k).float(),
                                   requires_grad=False)
        cos, sin = rope_tables(seq_len, hd, rope_theta)
        half = hd // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.register_buffer("cos_q", cos.reshape(1, seq_len, 1, hd), persistent=False)
        self.register_buffer("sin_q", sin.reshape(1, seq_len, 1, hd), persistent=False)
        self.register_buffer("cos_k", cos.reshape(1, 1, seq_len, hd), persistent=False)
        self.register_buffer("sin_k", sin.reshape(1, 1, seq_len, hd), persistent=False)
        inside = torch.ones(seq_len, seq_len)
        if sliding and window_radius < seq_len:
            inside = (band_bias(seq_len, window_radius, 1.0) + 1.0)
        self.register_buffer("band", inside.reshape(1, seq_len, 1, seq_len), persistent=False)
        self.sliding_band = bool(sliding and window_radius < seq_len)
        self.softmax_split = (float(scales.softmax_split)
                              if seq_len >= scales.softmax_split_from else 0.0)

    def graph_options(self) -> tuple:
        """What shapes the converted graph besides its tensors' values: segments with
        equal options and tensor shapes convert to the same ops (segment_graph)."""
        return ("attn", self.seq_len, self.heads, self.hd, self.max_product,
                self.sliding_band, self.softmax_split)

    def forward(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seq, heads, hd = self.seq_len, self.heads, self.hd
        q = apply_conv(self.q, a)                                              # [1, 1, T, H*D]
        q_r = torch.rsqrt(apply_conv(self.q_ms, q * q)).reshape(1, seq, heads, 1)
        q = q.reshape(1, seq, heads, hd) * q_r * self.q_gain
        q = q * self.cos_q + rotate_half(q) * self.sin_q                  # [1, T, H, D]
        k = apply_conv(self.k, a)                                              # [1, 1, T, D]
        k = k * torch.rsqrt(apply_conv(self.k_ms, k * k)) * self.k_gain
        k = k * self.cos_k + rotate_half(k) * self.sin_k                  # [1, 1, T, D] (= -k)
        v = apply_conv(self.v, a)                                              # [1, 1, T, D]
        neg = row_blocks(q.reshape(1, seq * heads, 1, hd), k, -1, self.max_product)
        neg = neg.reshape(1, seq, heads, seq)                              # -scores
        visible = mask.reshape(1, seq, 1, seq)
        if self.sliding_band:
            visible = visible * self.band
        # -max over the visible scores (masked ones read as 0: if every visible score is
        # negative the shift is 0 instead of the max, still exact in float)
        low = torch.amin(neg * visible, -1, keepdim=True)
        y = torch.relu(neg - low)                                          # >= 0 where visible
        e = exp_neg(y) * visible                                          # exp(-y), masked
        if self.softmax_split > 0.0:
            return apply_conv(self.o, self._two_range_weights(y, e, visible, v))
        inv = torch.rsqrt(e.sum(-1, keepdim=True))                         # 1 / sqrt(row sum)
        p = (e * inv).reshape(1, seq * heads, seq, 1)
        o = row_blocks(p, v, 2, self.max_product).reshape(1, seq, heads, hd)
        o = (o * inv).reshape(1, 1, seq, heads * hd)
        return apply_conv(self.o, o)

    def _two_range_weights(self, y: torch.Tensor, e: torch.Tensor, visible: torch.Tensor,
                           v: torch.Tensor) -> torch.Tensor:
        """sum_j exp(-y_j) v_j / sum_j exp(-y_j) with the weights in two int8 ranges:
        exp(-y) = r * fine + excess, fine = exp(-relu(y - ln(1/r))) in (0, 1], excess =
        relu(exp(-y) - r). Exact in float."""
        seq, heads, hd, r = self.seq_len, self.heads, self.hd, self.softmax_split
        fine = exp_neg(torch.relu(y - math.log(1.0 / r))) * visible
        excess = torch.relu(e - r)
        total = fine.sum(-1, keepdim=True) * r + excess.sum(-1, keepdim=True)
        inv = torch.rsqrt(total)                                           # 1 / sqrt(row sum)
        parts = [row_blocks((w * inv).reshape(1, seq * heads, seq, 1), v, 2,
                                    self.max_product) for w in (fine, excess)]
        o = (parts[0] * r + parts[1]).reshape(1, seq, heads, hd) * inv
        return o.reshape(1, 1, seq, heads * hd)


class MlpSegment(nn.Module):
    """One layer's MLP branch: rms-normalised input -> down_proj output (Coral ops)."""

    def __init__(self, layer: EncoderLayer, scales: LayerScales):
        super().__init__()
        inter = layer.intermediate
        col = layer.pre_ff_norm.gain.detach().double() * _t(scales.ff_in)
        w = layer.gate_up_proj.weight.detach().double() * col
        w_gate, w_up = w[:inter], w[inter:] / _t(scales.act)[:, None]
        w_down = layer.down_proj.weight.detach().double() * _t(scales.act)
        self.host_sum = np.ndim(scales.ff_out) == 2
        # one-entry lists: their names (gate.0, up.0, down.0) are part of the converted
        # graphs' tensor names, so they stay as when the MLP could be cut into channel groups
        self.gate = nn.ModuleList([conv1x1(w_gate)])
        self.up = nn.ModuleList([conv1x1(w_up)])
        self.split = float(scales.act_split)
        # the split as tensors, not Python floats: per-layer values must be graph
        # constants that segment_graph's templates can rewrite (a Python float is folded away)
        self.register_buffer("split_at", torch.tensor(self.split), persistent=False)
        self.register_buffer("neg_split_at", torch.tensor(-self.split), persistent=False)
        # partial outputs: the two ranges (fine, excess), or the one product
        partials = 2 if self.split > 0.0 else 1
        out_scale = (_t(scales.ff_out) if self.host_sum
                     else _t(scales.ff_out)[None].expand(partials, -1))
        if out_scale.shape[0] != partials:
            raise QuantizationError(f"{out_scale.shape[0]} output scales for {partials} "
                                    "partial MLP outputs")
        if self.split > 0.0:
            # the fine product is (gelu(gate) * up / split) clamped to +-1: its own up
            # weights (a distinct MUL, which the converter cannot merge with the coarse
            # one) and its own down weights times split; the excess goes through down.
            # With host_sum each partial has its own per-channel output scale.
            self.up_fine = conv1x1(w_up / self.split)
            self.down_fine = conv1x1(w_down / out_scale[0][:, None] * self.split)
            self.down = nn.ModuleList([conv1x1(w_down / out_scale[1][:, None])])
        else:
            self.down = nn.ModuleList([conv1x1(w_down / out_scale[0][:, None])])

    def graph_options(self) -> tuple:
        """What shapes the converted graph besides its tensors' values (as above)."""
        return ("mlp", self.host_sum, self.split > 0.0)

    def _two_range(self, b: torch.Tensor) -> torch.Tensor:
        gelu = gelu_sigmoid(apply_conv(self.gate[0], b))
        coarse = gelu * apply_conv(self.up[0], b)
        # MUL with a fused RELU_N1_TO_1: the int8 tensor saturates at +-split
        fine = torch.clamp(gelu * apply_conv(self.up_fine, b), -1.0, 1.0)
        # SUBs with fused RELUs: exactly 0 (the zero point) wherever |coarse| <= split
        excess = torch.relu(coarse - self.split_at) - torch.relu(self.neg_split_at - coarse)
        parts = (apply_conv(self.down_fine, fine), apply_conv(self.down[0], excess))
        if self.host_sum:
            return torch.cat(parts, dim=1)                                # [1, 2, T, C]
        return parts[0] + parts[1]

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if self.split > 0.0:
            return self._two_range(b)
        act = gelu_sigmoid(apply_conv(self.gate[0], b)) * apply_conv(self.up[0], b)
        return apply_conv(self.down[0], act)                             # [1, 1, T, C]


SegmentFn = Callable[[int, str, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def host_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def host_forward(core: EncoderCore, scales: Sequence[LayerScales], run: SegmentFn,
                 embeddings: torch.Tensor, mask: torch.Tensor, pool: torch.Tensor,
                 record: Optional[Callable[[int, str, torch.Tensor], None]] = None
                 ) -> torch.Tensor:
    """The host's part of the segmented encoder, with ``run(layer, kind, input, mask)``
    computing a segment (torch modules, or int8 TFLite graphs on the device).

    ``record(layer, name, tensor)`` sees every segment input and output, the output
    after the host's per-channel scale and partial sum (calibration, identity scales).
    """
    spec = core.spec
    seq = embeddings.shape[1]
    x = embeddings[0].double() * spec.embed_scale
    # Padding rows get the first token's row: a zero row would normalise to rsqrt(eps)
    # = 1e3 and stretch every int8 range it reaches. Padding is masked both ways and
    # never pooled, so its value does not touch the result.
    padding = pool[0].sum(0) == 0
    x[padding] = x[0].clone()
    for i, layer in enumerate(core.layers):
        s = scales[i]
        for kind, pre, post, s_in, s_out, name in (
                ("attn", layer.input_norm, layer.post_attn_norm, s.attn_in, s.attn_out, "attn"),
                ("mlp", layer.pre_ff_norm, layer.post_ff_norm, s.ff_in, s.ff_out, "ff")):
            h = host_rms(x, pre.eps) / _t(s_in)
            if record:
                record(i, f"{name}_in", h)
            out = run(i, kind, h.float().reshape(1, 1, seq, -1), mask if kind == "attn" else None)
            # per-channel output scales; [G, C] when the segment returns G partials to add
            width = x.shape[-1]
            out = (out.reshape(-1, seq, width).double() * _t(s_out).reshape(-1, 1, width)).sum(0)
            if record:
                record(i, f"{name}_out", out)
            x = x + host_rms(out, post.eps) * post.gain.double()
    x = host_rms(x, core.final_norm.eps) * core.final_norm.gain.double()
    pooled = pool[0].double() @ x
    if core.dense_has_bias:
        pooled = pooled / torch.clamp(pool[0].sum(-1, keepdim=True).double(), min=1e-9)
    for dense in core.dense:
        pooled = nn.functional.linear(pooled, dense.weight.double(),
                                      None if dense.bias is None else dense.bias.double())
    norm = torch.rsqrt(torch.clamp(pooled.pow(2).sum(-1, keepdim=True), min=1e-24))
    return (pooled * norm).float().unsqueeze(0)


def layer_segments(core: EncoderCore, seq_len: int, scales: Sequence[LayerScales],
                   max_product: int = DEFAULT_MAX_PRODUCT
                   ) -> list[tuple[AttentionSegment, MlpSegment]]:
    spec = core.spec
    out = []
    for i, layer in enumerate(core.layers):
        sliding = spec.layer_types[i] == "sliding_attention"
        theta = spec.rope_theta_local if sliding else spec.rope_theta_global
        out.append((AttentionSegment(layer, seq_len, sliding, spec.window_radius, theta,
                                     scales[i], max_product).eval(),
                    MlpSegment(layer, scales[i]).eval()))
    return out


def torch_runner(segments: Sequence[tuple[AttentionSegment, MlpSegment]]) -> SegmentFn:
    def run(i: int, kind: str, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        attn, mlp = segments[i]
        return attn(x, mask) if kind == "attn" else mlp(x)
    return run


@torch.no_grad()
def measure_scales(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]],
                   smoothing: Smoothing = Smoothing()) -> list[LayerScales]:
    """Per-channel scales from float runs over calibration inputs (the corpus, never held-out).

    Layer i's scales depend only on layers < i being exact, so one float pass with
    identity scales collects every absmax; weights' column maxima come from the
    checkpoint.
    """
    spec = core.spec
    c = spec.hidden_size
    n = len(core.layers)
    stats: dict[tuple[int, str], torch.Tensor] = {}

    def keep(i: int, name: str, t: torch.Tensor) -> None:
        t = t.reshape(-1, t.shape[-1]).abs().amax(0).float()
        key = (i, name)
        stats[key] = torch.maximum(stats[key], t) if key in stats else t

    live_now: list[torch.Tensor] = []  # tokens of the current sample that belong to a text
    hq = spec.num_heads * spec.head_dim

    def keep_qkv(i: int, qkv: torch.Tensor) -> None:  # raw q, k, v as the projection gives them
        live = live_now[0]
        keep(i, "q", qkv[:, :hq][live])
        keep(i, "k", qkv[:, hq:hq + spec.head_dim][live])
        keep(i, "v", qkv[:, hq + spec.head_dim:][live])

    hooks = [layer.qkv_proj.register_forward_hook(
        lambda _m, _inp, out, i=i: keep_qkv(i, out)) for i, layer in enumerate(core.layers)]
    encoders: dict[int, BucketEncoder] = {}

    def float_pass(mlp_out: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """Every sample through the float host loop; ``mlp_out(layer, act)`` ends the MLPs."""
        for sample in samples:
            live_now[:] = [torch.from_numpy(sample["pool"][0]).sum(0) > 0]
            reference_forward(core, sample, lambda i, name, t: keep(i, name, t[live_now[0]]),
                              mlp_out, encoders)

    def first(i: int, act: torch.Tensor) -> torch.Tensor:
        keep(i, "act", act[live_now[0]])
        return core.layers[i].down_proj(act)

    try:
        float_pass(first)
    finally:
        for hook in hooks:
            hook.remove()
    act_scales = [smooth(stats[(i, "act")], layer.down_proj.weight.detach().abs().amax(0),
                         smoothing.act) for i, layer in enumerate(core.layers)]
    # the product's absmax after smoothing sets where its fine tensor saturates
    splits = [smoothing.mlp_split * float((stats[(i, "act")] / act_scales[i]).max())
              if smoothing.mlp_split > 0.0 else 0.0 for i in range(n)]
    if smoothing.mlp_host_sum and max(splits) > 0.0:
        # second pass: each partial down projection (the fine and the excess range of
        # the product), its own per-channel absmax

        def partials(i: int, act: torch.Tensor) -> torch.Tensor:
            w = core.layers[i].down_proj.weight
            full = core.layers[i].down_proj(act)
            if splits[i] > 0.0:
                scale = act_scales[i].to(act.dtype)
                fine = ((act / scale).clamp(-splits[i], splits[i]) * scale) @ w.T
                keep(i, "ff_out_0", fine[live_now[0]])
                keep(i, "ff_out_1", (full - fine)[live_now[0]])
            else:  # (a layer whose product is all zero: one partial)
                keep(i, "ff_out_0", (act @ w.T)[live_now[0]])
            return full

        float_pass(partials)
    out = []
    for i, layer in enumerate(core.layers):
        hd = spec.head_dim
        w_qkv = layer.qkv_proj.weight.detach() * layer.input_norm.gain.detach()
        attn_in = smooth(stats[(i, "attn_in")], w_qkv.abs().amax(0), smoothing.attn_in)
        w_gu = layer.gate_up_proj.weight.detach() * layer.pre_ff_norm.gain.detach()
        ff_in = smooth(stats[(i, "ff_in")], w_gu.abs().amax(0), smoothing.ff_in)
        w_o = layer.o_proj.weight.detach().abs().reshape(c, spec.num_heads, hd).amax((0, 1))
        v = smooth(stats[(i, "v")], w_o, smoothing.v)
        act = act_scales[i]
        # outputs: per-channel absmax of the unscaled branch outputs (recorded with
        # identity scales), so every output channel spans the same int8 range
        attn_out = stats[(i, "attn_out")].clamp(min=1e-6)
        ff_out = stats[(i, "ff_out")].clamp(min=1e-6)
        if (i, "ff_out_0") in stats:  # [G, C]: partial outputs summed on the host
            count = 2 if splits[i] > 0.0 else 1
            ff_out = torch.stack([stats[(i, f"ff_out_{k}")]
                                  for k in range(count)]).clamp(min=1e-6)
        q_abs, k_abs = stats[(i, "q")].clamp(min=1e-6), stats[(i, "k")].clamp(min=1e-6)
        out.append(LayerScales(*(t.numpy().astype(np.float32) for t in
                                 (attn_in, v, attn_out, ff_in, act, ff_out, q_abs, k_abs)),
                               act_split=splits[i],
                               softmax_split=smoothing.softmax_split,
                               softmax_split_from=smoothing.softmax_split_from))
    if not all(np.isfinite(v).all() for s in out for v in vars(s).values() if v is not None):
        raise QuantizationError("per-channel scales are not finite: the float encoder "
                                "produced inf/NaN on the calibration inputs")
    return out


def reference_forward(core: EncoderCore, sample: dict[str, np.ndarray],
                      record: Callable[[int, str, torch.Tensor], None],
                      mlp_out: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                      encoders: Optional[dict[int, BucketEncoder]] = None) -> None:
    """One sample through the host loop with identity scales, each branch computed by the
    encoder's own float layers (matmul attention): what the segments compute in float,
    10x faster than their torch modules (elementwise MUL+SUM attention) at 256 tokens.
    ``record`` sees every branch input and output (``host_forward``); ``mlp_out(layer,
    act)`` ends the MLPs (default: down_proj); ``encoders`` caches the per-bucket RoPE
    tables and masks across calls."""
    seq = sample["embeddings"].shape[1]
    encoders = {} if encoders is None else encoders
    if seq not in encoders:
        encoders[seq] = BucketEncoder(core, seq)
    per_layer = encoders[seq].layer_inputs(torch.from_numpy(sample["mask"]))

    def run(i: int, kind: str, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        layer = core.layers[i]
        h = x.reshape(seq, -1)
        if kind == "attn":
            rope, bias = per_layer[i]
            return layer.attention(h * layer.input_norm.gain, rope, bias)
        gate_up = layer.gate_up_proj(h * layer.pre_ff_norm.gain)
        g, u = gate_up[:, :layer.intermediate], gate_up[:, layer.intermediate:]
        act = nn.functional.gelu(g, approximate="tanh") * u
        return mlp_out(i, act) if mlp_out else layer.down_proj(act)

    spec = core.spec
    ident = [LayerScales.identity(spec.hidden_size, spec.head_dim, spec.intermediate_size,
                                  spec.num_heads) for _ in core.layers]
    host_forward(core, ident, run, *sample_tensors(sample), record=record)


@torch.no_grad()
def segment_inputs(core: EncoderCore, scales: Sequence[LayerScales],
                   samples: Sequence[dict[str, np.ndarray]]
                   ) -> dict[tuple[int, str], list[dict[str, np.ndarray]]]:
    """Each segment's inputs ({(layer, kind): [feeds]}) as the float host loop makes them:
    the segments' calibration data (the host computes them in float on the device too).

    The stream comes from the encoder's float layers with identity scales and each input
    is divided by its segment's input scale afterwards: the same numbers as a host loop
    over the float segments (``check_float``: cosine >= 0.99999; a test compares the two)
    at a fraction of the time (the export runs it while its workers already convert).
    """
    c = core.spec.hidden_size
    encoders: dict[int, BucketEncoder] = {}
    inputs: dict[tuple[int, str], list[dict[str, np.ndarray]]] = {}
    for sample in samples:
        seq = sample["embeddings"].shape[1]

        def rec(i: int, name: str, t: torch.Tensor, seq: int = seq,
                mask: np.ndarray = sample["mask"]) -> None:
            if name == "attn_in":
                x = (t / _t(scales[i].attn_in)).float().reshape(1, 1, seq, c).numpy()
                inputs.setdefault((i, "attn"), []).append({"a": x, "mask": mask})
            elif name == "ff_in":
                x = (t / _t(scales[i].ff_in)).float().reshape(1, 1, seq, c).numpy()
                inputs.setdefault((i, "mlp"), []).append({"b": x})

        reference_forward(core, sample, rec, encoders=encoders)
    return inputs


def sample_tensors(sample: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """A graph-input dict as the (embeddings, mask, pool) tensors the encoders take."""
    return [torch.from_numpy(sample[k]) for k in ("embeddings", "mask", "pool")]
