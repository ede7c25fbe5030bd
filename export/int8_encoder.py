"""EmbeddingGemma rewritten for a FULLY int8 graph (per-tensor activation scales).

``Int8BucketEncoder`` computes the same function as ``encoder.BucketEncoder``
(same inputs, same L2-normalised output; verified to cosine >= 0.99999 in float)
from the same ``EncoderCore`` weights, but every tensor it produces has a range
that one per-tensor int8 scale can hold. Each rewrite is exact in float:

1. Residual stream flattening (the decisive one). Gemma's residual stream has a
   handful of outlier channels: on EmbeddingGemma channel 731 reaches 1.6e5
   while the median channel's max is ~1.6e3 (layer 23), so one int8 scale leaves
   most channels with zero or one level. The graph carries ``r = x * d`` instead,
   with a constant per-channel ``d`` (measured on calibration text) that brings
   every channel to a similar range. This is exact because every write into the
   stream comes from a post-norm whose gain can absorb ``d`` and every read goes
   through a norm whose gain can absorb ``1 / d``:
   - the entry ``x0 = e * sqrt(H)`` becomes a diagonal FULLY_CONNECTED with
     weights ``sqrt(H) * d`` (per-output-channel weight scales make a diagonal
     exact in int8, unlike a MUL by a constant vector with one scale);
   - post-attention / post-FFN norm gains ``g`` become ``g * d`` and are folded
     into the rows of o_proj / down_proj (exact: per-row weight scales);
   - pre-norm gains ``g`` become ``g / d`` and are folded into the columns of
     q/k/v, gate/up and the first Dense layer (via the pooling sum).
2. RMSNorm with no per-channel constant multiply: ``mean(x^2)`` of the original
   stream is a FULLY_CONNECTED [H -> 1] of ``r * r`` with weights ``1 / (d^2 H)``;
   the norm then is ``r * rsqrt(ms + eps)`` and its gain lives in the next
   weights (rewrite 1). Post-norms do the same on the already-scaled branch
   output. (x.pow(2) would become SQUARE, which has no int8 kernel: x * x.)
3. Multiplicative attention mask: masked scores are set to exactly ``-penalty``
   (``s * m + (m - 1) * penalty``) rather than ``s - 1e4``: the -1e4 sentinel
   would own the whole int8 range of the scores and leave ~40 levels of 1e4/255
   for the real scores. EmbeddingGemma's visible scores lie in [-21, 35];
   ``penalty`` only needs to be far enough below each row's maximum.
4. Pooling by ``pool * rsqrt(count + 1)``: a plain 0/1 sum grows with the text
   length (1..T tokens in one tensor scale); dividing by sqrt(count) shrinks the
   spread to sqrt(T). The per-text factor is any positive scalar: the final L2
   norm cancels it (the Dense layers have no bias; with a bias the exact mean
   is used instead), so its int8 rounding does not matter either.
5. Output conditioning: the last Dense layer is scaled so projections have RMS ~1
   and the L2 norm adds a small ``eps`` (never rsqrt of an exact zero for an
   empty pooling slot, which int8 cannot represent); scale-free, so exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .encoder import BucketEncoder, EncoderCore, EncoderLayer, band_bias, rope_tables

DEFAULT_INT8_MASK_PENALTY = 40.0


def _lin(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
    return layer


def _mean_square(weights: torch.Tensor) -> nn.Linear:
    """FULLY_CONNECTED [H -> 1]: mean over channels of (v_c / weights_c)^2 given v*v."""
    h = weights.numel()
    return _lin((1.0 / (weights.double() ** 2 * h)).float()[None, :])


@torch.no_grad()
def stream_absmax(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]]) -> torch.Tensor:
    """Per-channel max |x| of the residual stream over all layers and calibration samples."""
    amax = torch.zeros(core.spec.hidden_size)
    encoders: dict[int, BucketEncoder] = {}
    for s in samples:
        t = int(s["embeddings"].shape[1])
        enc = encoders.setdefault(t, BucketEncoder(core, t).eval())
        x = torch.from_numpy(s["embeddings"])[0] * enc.embed_scale
        mask = torch.from_numpy(s["mask"])[0]
        bias_full = (mask - 1.0) * enc.mask_penalty
        bias_local = bias_full + enc.band if enc.needs_band else bias_full
        amax = torch.maximum(amax, x.abs().amax(0))
        for layer, sliding in zip(core.layers, enc.is_sliding):
            if sliding:
                x = layer(x, enc.cos_local, enc.sin_local, bias_local)
            else:
                x = layer(x, enc.cos_global, enc.sin_global, bias_full)
            amax = torch.maximum(amax, x.abs().amax(0))
    return amax


def stream_scale(absmax: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """d = (median / absmax)^beta: beta 1 flattens every channel to the same range."""
    a = absmax.double().clamp(min=float(absmax.max()) * 1e-6)
    return ((a.median() / a) ** beta).float()


class Int8Layer(nn.Module):
    """One EncoderLayer with the norm gains and the stream scale folded into its weights."""

    def __init__(self, layer: EncoderLayer, d: torch.Tensor):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = layer.num_heads, layer.num_kv, layer.head_dim
        self.eps = layer.input_norm.eps
        d = d.double()
        g_in = layer.input_norm.gain.double() / d
        self.ms_stream = _mean_square(d.float())
        self.q_proj = _lin(layer.q_proj.weight.double() * g_in)
        self.k_proj = _lin(layer.k_proj.weight.double() * g_in)
        self.v_proj = _lin(layer.v_proj.weight.double() * g_in)
        self.q_norm, self.k_norm = layer.q_norm, layer.k_norm
        g_pa = layer.post_attn_norm.gain.double() * d
        self.o_proj = _lin(layer.o_proj.weight.double() * g_pa[:, None])
        self.ms_attn = _mean_square(g_pa.float())
        g_ff = layer.pre_ff_norm.gain.double() / d
        self.gate_proj = _lin(layer.gate_proj.weight.double() * g_ff)
        self.up_proj = _lin(layer.up_proj.weight.double() * g_ff)
        g_pf = layer.post_ff_norm.gain.double() * d
        self.down_proj = _lin(layer.down_proj.weight.double() * g_pf[:, None])
        self.ms_mlp = _mean_square(g_pf.float())
        self._rope = layer._rope

    def _norm(self, v: torch.Tensor, ms: nn.Linear) -> torch.Tensor:
        return v * torch.rsqrt(ms(v * v) + self.eps)

    def forward(self, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keep: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        hd, group = self.head_dim, self.num_heads // self.num_kv
        h = self._norm(r, self.ms_stream)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        keys, values = [], []
        for g in range(self.num_kv):
            keys.append(self._rope(self.k_norm(k[:, g * hd:(g + 1) * hd]), cos, sin).transpose(0, 1))
            values.append(v[:, g * hd:(g + 1) * hd])
        heads = []
        for i in range(self.num_heads):
            q_i = self._rope(self.q_norm(q[:, i * hd:(i + 1) * hd]), cos, sin)
            scores = (q_i @ keys[i // group]) * keep + drop
            heads.append(torch.softmax(scores, dim=-1) @ values[i // group])
        r = r + self._norm(self.o_proj(torch.cat(heads, dim=-1)), self.ms_attn)
        h = self._norm(r, self.ms_stream)
        mlp = self.down_proj(nn.functional.gelu(self.gate_proj(h), approximate="tanh")
                             * self.up_proj(h))
        return r + self._norm(mlp, self.ms_mlp)


class Int8Core(nn.Module):
    """Folded weights shared by every bucket (built once from an EncoderCore)."""

    def __init__(self, core: EncoderCore, absmax: torch.Tensor, beta: float = 1.0,
                 output_rms: Optional[float] = None):
        super().__init__()
        self.spec = core.spec
        d = stream_scale(absmax, beta)
        self.register_buffer("stream_scale", d)
        self.entry = _lin(torch.diag(d.double() * core.spec.embed_scale))
        self.layers = nn.ModuleList(Int8Layer(layer, d) for layer in core.layers)
        self.eps = core.final_norm.eps
        self.ms_final = _mean_square(d)
        self.dense_has_bias = core.dense_has_bias
        dense = [nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                 for m in core.dense]
        for new, old in zip(dense, core.dense):
            new.weight = nn.Parameter(old.weight.detach().clone(), requires_grad=False)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        g_f = core.final_norm.gain.double() / d.double()
        if dense:
            dense[0].weight = nn.Parameter((dense[0].weight.double() * g_f).float(),
                                           requires_grad=False)
            self.final_gain = None
        else:
            self.register_buffer("final_gain", g_f.float())
        if dense and output_rms and not self.dense_has_bias:
            dense[-1].weight = nn.Parameter(dense[-1].weight / output_rms, requires_grad=False)
        self.dense = nn.ModuleList(dense)


@torch.no_grad()
def output_rms(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]]) -> float:
    """RMS of the un-normalised projection per text (to condition the final L2 norm)."""
    values = []
    for s in samples:
        enc = BucketEncoder(core, int(s["embeddings"].shape[1])).eval()
        x = torch.from_numpy(s["embeddings"])[0] * enc.embed_scale
        mask = torch.from_numpy(s["mask"])[0]
        bias_full = (mask - 1.0) * enc.mask_penalty
        bias_local = bias_full + enc.band if enc.needs_band else bias_full
        for layer, sliding in zip(core.layers, enc.is_sliding):
            cos, sin = (enc.cos_local, enc.sin_local) if sliding else (enc.cos_global, enc.sin_global)
            x = layer(x, cos, sin, bias_local if sliding else bias_full)
        pool = torch.from_numpy(s["pool"])[0]
        count = pool.sum(-1, keepdim=True)
        pooled = (pool @ core.final_norm(x)) * torch.rsqrt(count + 1.0)
        for dense in core.dense:
            pooled = dense(pooled)
        live = count[:, 0] > 0
        values.append(pooled[live].pow(2).mean(-1).sqrt())
    return float(torch.cat(values).median())


def build_int8_core(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]],
                    beta: float = 1.0) -> Int8Core:
    """Measure the stream on calibration inputs and fold everything (float, exact)."""
    return Int8Core(core, stream_absmax(core, samples), beta, output_rms(core, samples)).eval()


class Int8BucketEncoder(nn.Module):
    """Same signature and output as BucketEncoder; int8-friendly ops and ranges."""

    def __init__(self, icore: Int8Core, seq_len: int,
                 mask_penalty: float = DEFAULT_INT8_MASK_PENALTY, l2_eps: float = 1e-6):
        super().__init__()
        self.core = icore
        self.seq_len = seq_len
        self.mask_penalty = mask_penalty
        self.l2_eps = l2_eps
        spec = icore.spec

        self.is_sliding = [t == "sliding_attention" for t in spec.layer_types]
        for name, theta in (("global", spec.rope_theta_global), ("local", spec.rope_theta_local)):
            cos, sin = rope_tables(seq_len, spec.head_dim, theta)
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)
        self.needs_band = any(self.is_sliding) and spec.window_radius < seq_len
        self.register_buffer("band", (band_bias(seq_len, spec.window_radius, 1.0) + 1.0),
                             persistent=False)  # 1 inside the window, 0 outside

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor,
                pool: torch.Tensor) -> torch.Tensor:
        core = self.core
        r = core.entry(embeddings[0])
        keep_full = mask[0]
        keep_local = keep_full * self.band if self.needs_band else keep_full
        drop_full = (keep_full - 1.0) * self.mask_penalty
        drop_local = (keep_local - 1.0) * self.mask_penalty if self.needs_band else drop_full
        for layer, sliding in zip(core.layers, self.is_sliding):
            if sliding:
                r = layer(r, self.cos_local, self.sin_local, keep_local, drop_local)
            else:
                r = layer(r, self.cos_global, self.sin_global, keep_full, drop_full)
        h = r * torch.rsqrt(core.ms_final(r * r) + core.eps)
        if core.final_gain is not None:
            h = h * core.final_gain
        p = pool[0]
        count = p.sum(-1, keepdim=True)
        if core.dense_has_bias:
            weights = p / torch.clamp(count, min=1.0)
        else:
            weights = p * torch.rsqrt(count + 1.0)
        pooled = weights @ h
        for dense in core.dense:
            pooled = dense(pooled)
        norm = torch.rsqrt((pooled * pooled).sum(-1, keepdim=True) + self.l2_eps)
        return (pooled * norm).unsqueeze(0)
