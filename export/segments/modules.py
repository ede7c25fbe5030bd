"""The torch modules of one layer's two full-int8 segments, and their per-channel scales.

``AttentionSegment`` and ``MlpSegment`` compute, in float, exactly what the layer's
attention and MLP branches compute (``check_float`` in ``host`` tests it), rewritten so
that per-tensor int8 keeps them (the package docstring lists the rewrites) and with only
Edge TPU-mappable ops (``coral_ops``). ``LayerScales`` holds the per-channel vectors
folded into their weights, measured by ``calibration.measure_scales``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from gemma_edge.errors import QuantizationError

from ..coral_ops import (
    DEFAULT_MAX_PRODUCT,
    apply_conv,
    conv1x1,
    exp_neg,
    gelu_sigmoid,
    rotate_half,
    row_blocks,
)
from ..encoder import EncoderLayer, band_bias, rope_tables


@dataclass
class LayerScales:
    """Per-channel vectors of one layer (float32 numpy), shared by every bucket."""

    attn_in: np.ndarray   # [C] segment input = rms(x) / attn_in
    v: np.ndarray         # [D] V channel d is divided by v[d] (o_proj columns multiplied)
    attn_out: np.ndarray  # [C] o_proj output channel c is divided by attn_out[c]
    ff_in: np.ndarray     # [C]
    act: np.ndarray       # [I] GELU(gate) * up channel j is divided by act[j]
    ff_out: np.ndarray    # [C], or [2, C]: the MLP segment returns its two partials
    q: np.ndarray         # [H*D] raw q channel absmax: the graph carries q / q_scale
    k: np.ndarray         # [D]
    # GELU(gate) * up / act carried as two int8 tensors (SegmentRecipe.mlp_split): a fine
    # one that saturates at act_split and the excess beyond it; 0: one tensor
    act_split: float = 0.0
    # exp(-y) of the softmax carried as two int8 tensors (SegmentRecipe.softmax_split): a
    # fine one, min(exp(-y) / softmax_split, 1), and the excess of exp(-y) beyond
    # softmax_split; 0: one tensor
    softmax_split: float = 0.0
    # the smallest bucket (tokens) whose attention segments use softmax_split
    softmax_split_from: int = 0
    # [D] raw V channel absmax: the qkv segment of a split attention divides by it
    v_abs: Optional[np.ndarray] = None
    # buckets of at most this many tokens split their attention (split_attention.py); 0: none
    host_attention_upto: int = 0

    @staticmethod
    def identity(c: int, d: int, i: int, heads: int = 1) -> LayerScales:
        """All-ones scales: the branches as the float encoder computes them."""
        one = np.ones
        return LayerScales(one(c, np.float32), one(d, np.float32), one(c, np.float32),
                           one(c, np.float32), one(i, np.float32), one(c, np.float32),
                           one(heads * d, np.float32), one(d, np.float32))


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
        # (ai-edge-quantizer has no int8 REDUCE_MAX).
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
        equal options and tensor shapes convert to the same ops (``graph``)."""
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
        # constants that the graph templates can rewrite (a Python float is folded away)
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


# litert-torch names every tensor of a converted graph after the module stack, qualified
# class names included ("gemma_edge.export.segments.AttentionSegment_inner/..."): the
# segments keep the names they had before export/segments/ became a package, so their
# graphs stay byte-identical to earlier exports (and pickling, which the export's worker
# processes use, finds them in the package, which re-exports them).
AttentionSegment.__module__ = "gemma_edge.export.segments"
MlpSegment.__module__ = "gemma_edge.export.segments"
