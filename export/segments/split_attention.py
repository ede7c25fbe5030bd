"""Attention with its core on the host: two int8 projection segments, softmax in float.

Why: in the all-int8 attention segment (``AttentionSegment``) the softmax chain rounds
what short texts depend on. The scores' ``exp``, the row sum and the weights x V
products are int8 tensors with one scale each, and for short everyday sentences in
some scripts (issue 20: Hebrew, Ukrainian, Arabic, Thai, Swahili) these tensors carry
11-14 dB against ~20 dB for texts that do well, so 9 of 1,216 held-out sentences fell
below cosine 0.97 to float. No calibration, range statistic or split fraction removed
that (docs/quantization.md). The attention core holds no weights, though: every weight
of a layer is in its q/k/v and o projections. Here the projections stay on the Edge TPU
as two fully int8 1x1-convolution segments and the host computes, in float32, what lies
between them - the q/k RMSNorms, RoPE, the scores, the softmax and the weights x V:

    attn_qkv segment  a [1, 1, T, C] int8  -> [q / u_q, k / u_k, v / u_v] [1, 1, T, (H+2) D] int8
    host (float)      q/k norms, RoPE, softmax(q k^T + mask) v, divided by s_o per channel
    attn_o segment    o [1, 1, T, H D] int8 -> o_proj output / attn_out [1, 1, T, C] int8

``u`` is each q/k/v channel's calibrated absmax, so one per-tensor int8 scale gives every
channel its full range; ``s_o`` is V's SmoothQuant scale (``LayerScales.v``), moved into
o_proj's weight columns as in ``AttentionSegment``. The host's share is
``2 H T^2 D`` multiply-adds per layer (3 M at 64 tokens): the recipe uses it for the
short buckets only (``SegmentRecipe.host_attention_upto``), where the tail is and the
cost is small; the device's numpy twin is ``device/host_attention.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..coral_ops import apply_conv, conv1x1, rms, rotate_half
from ..encoder import DEFAULT_MASK_PENALTY, EncoderLayer, band_bias, rope_for_heads
from .modules import LayerScales, _t

QKV, OUT = "attn_qkv", "attn_o"  # the two segment kinds (file names: attn_qkv_T_L.tflite)


class QkvSegment(nn.Module):
    """rms-normalised input -> q, k, v, each channel divided by its calibrated absmax."""

    def __init__(self, layer: EncoderLayer, scales: LayerScales):
        super().__init__()
        col = layer.input_norm.gain.detach().double() * _t(scales.attn_in)
        w = layer.qkv_proj.weight.detach().double() * col
        self.proj = conv1x1(w / qkv_absmax(scales)[:, None])

    def graph_options(self) -> tuple:
        return (QKV,)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return apply_conv(self.proj, b)                                  # [1, 1, T, (H+2) D]


class AttnOutSegment(nn.Module):
    """The attention output divided per channel by s_o -> o_proj output / attn_out."""

    def __init__(self, layer: EncoderLayer, scales: LayerScales):
        super().__init__()
        w_o = layer.o_proj.weight.detach().double() * _t(scales.v).repeat(layer.num_heads)
        self.proj = conv1x1(w_o / _t(scales.attn_out)[:, None])

    def graph_options(self) -> tuple:
        return (OUT,)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return apply_conv(self.proj, b)                                  # [1, 1, T, C]


def qkv_absmax(scales: LayerScales) -> torch.Tensor:
    """[(H+2) D]: the divisors of the qkv segment's output channels."""
    if scales.v_abs is None:
        raise ValueError("these scales have no V absmax (measure_scales records it)")
    return torch.cat([_t(scales.q), _t(scales.k), _t(scales.v_abs)])


class SplitAttentionSegment(nn.Module):
    """One layer's attention branch as ``AttentionSegment`` computes it (same input, same
    output), in three parts: the qkv segment, the host core, the o segment."""

    def __init__(self, layer: EncoderLayer, seq_len: int, sliding: bool, window_radius: int,
                 rope_theta: float, scales: LayerScales):
        super().__init__()
        self.heads, self.hd, self.seq_len = layer.num_heads, layer.head_dim, seq_len
        if layer.num_kv != 1:
            raise ValueError("the segmented encoder supports one KV head (EmbeddingGemma)")
        self.qkv = QkvSegment(layer, scales)
        self.out = AttnOutSegment(layer, scales)
        self.register_buffer("u", qkv_absmax(scales), persistent=False)
        self.register_buffer("s_o", _t(scales.v).repeat(self.heads), persistent=False)
        self.register_buffer("q_gain", layer.q_norm.gain.detach().double(), persistent=False)
        self.register_buffer("k_gain", layer.k_norm.gain.detach().double(), persistent=False)
        self.eps = float(layer.q_norm.eps)
        rope = rope_for_heads(seq_len, self.hd, rope_theta)
        self.register_buffer("cos", rope.cos.double(), persistent=False)
        self.register_buffer("sin", rope.sin.double(), persistent=False)
        band = torch.zeros(seq_len, seq_len, dtype=torch.float64)
        if sliding and window_radius < seq_len:
            band = band_bias(seq_len, window_radius, DEFAULT_MASK_PENALTY).double()
        self.register_buffer("band", band, persistent=False)

    def parts(self) -> list[tuple[str, nn.Module]]:
        """The two graphs to convert, in the order the device runs them."""
        return [(QKV, self.qkv), (OUT, self.out)]

    def core(self, qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The host's float work: qkv segment output [1, 1, T, (H+2) D] (as the segment
        gives it) and mask [1, T, T] -> the o segment's input [1, 1, T, H D]."""
        seq, heads, hd = self.seq_len, self.heads, self.hd
        x = qkv.reshape(seq, -1).double() * self.u
        q = x[:, :heads * hd].reshape(seq, heads, hd).transpose(0, 1)      # [H, T, D]
        k, v = x[:, heads * hd:(heads + 1) * hd], x[:, (heads + 1) * hd:]   # [T, D]
        q = self._rope(rms(q, self.eps) * self.q_gain)
        k = self._rope(rms(k, self.eps) * self.k_gain)
        bias = (mask.reshape(seq, seq).double() - 1.0) * DEFAULT_MASK_PENALTY + self.band
        probs = torch.softmax(q @ k.T + bias, dim=-1)                      # [H, T, T]
        o = (probs @ v).transpose(0, 1).reshape(seq, heads * hd)
        return (o / self.s_o).float().reshape(1, 1, seq, heads * hd)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cos + rotate_half(x) * self.sin  # sin carries rotate_half's sign

    def forward(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.core(self.qkv(a), mask))

    def run_with(self, qkv_fn, out_fn, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The branch with the two projections computed by ``qkv_fn`` / ``out_fn`` (int8
        graphs): what the device computes."""
        return out_fn(self.core(qkv_fn(a), mask))


def host_attention_constants(layers: list[EncoderLayer], scales: list[LayerScales],
                             rope_thetas: list[float], windows: list[int]) -> dict[str, np.ndarray]:
    """What the device's host core needs besides host.npz's other constants (float32):
    the q/k norm gains, V's channel absmax (with q_scale and k_scale the qkv segment's
    divisors), RoPE's base and the sliding window per layer (0: global attention)."""
    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy().astype(np.float32)

    return {
        "q_norm_gain": np.stack([f32(layer.q_norm.gain) for layer in layers]),
        "k_norm_gain": np.stack([f32(layer.k_norm.gain) for layer in layers]),
        "v_abs": np.stack([np.asarray(s.v_abs, np.float32) for s in scales]),
        "rope_theta": np.asarray(rope_thetas, np.float32),
        "window_radius": np.asarray(windows, np.int32),
        "num_heads": np.int32(layers[0].num_heads),
        "head_dim": np.int32(layers[0].head_dim),
    }
