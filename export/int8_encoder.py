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

from .encoder import EncoderCore, EncoderLayer, band_bias, rope_tables

DEFAULT_INT8_MASK_PENALTY = 40.0


def _lin(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
    return layer


class MeanSquareNorm(nn.Module):
    """``v * rsqrt(mean_c((v_c / w_c)^2) + eps)``: RMSNorm of ``v / w`` applied to ``v``.

    The weighted mean is a FULLY_CONNECTED of ``v * v`` whose weights ``1/(w^2 H)``
    span up to 1e9 on EmbeddingGemma; one row would quantise all but the largest to
    zero, so channels are grouped by weight magnitude (a factor <= 16 per group), one
    output row per group (per-row int8 weight scales), then summed. Weights are
    normalised to max 1 and the factor returns exactly as a scalar on the rsqrt:
    rsqrt(k ms + k eps) * sqrt(k) = rsqrt(ms + eps).
    """

    def __init__(self, weights: torch.Tensor, eps: float, group_ratio: float = 16.0):
        super().__init__()
        w = 1.0 / (weights.double() ** 2 * weights.numel())
        k = 1.0 / float(w.max())
        w = w * k
        group = torch.floor(-torch.log(w) / np.log(group_ratio)).long()
        rows = [torch.where(group == g, w, torch.zeros_like(w)) for g in torch.unique(group)]
        self.ms = _lin(torch.stack(rows).float())
        self.eps = eps * k
        self.root_k = k ** 0.5

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        ms = self.ms(v * v).sum(-1, keepdim=True)
        return v * (torch.rsqrt(ms + self.eps) * self.root_k)


class GainNorm(nn.Module):
    """A post-norm: ``v * rsqrt(mean(v^2) + eps) * gain``; ``gain`` includes the stream's d.

    The mean uses uniform FC weights (exact in int8). The gain is a MUL by a constant
    vector with one int8 scale: its small entries lose relative precision, but the
    error is below the step of the stream tensor it is added to.
    """

    def __init__(self, gain: torch.Tensor, eps: float):
        super().__init__()
        self.norm = MeanSquareNorm(torch.ones(gain.numel()), eps)
        self.gain = nn.Parameter(gain.float(), requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.norm(v) * self.gain


def stream_scale(absmax: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """d = (median / absmax)^beta: beta 1 flattens every channel to the same range."""
    a = absmax.double().clamp(min=float(absmax.max()) * 1e-6)
    return ((a.median() / a) ** beta).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half's sign folded into the sin table."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[:, half:], x[:, :half]], dim=-1) * sin_signed


class HeadNorm(nn.Module):
    """The q/k RMSNorm over one head (gain and the score scale as one constant)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.gain = nn.Parameter(norm.gain.detach().clone(), requires_grad=False)
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.gain


class Int8Layer(nn.Module):
    """One EncoderLayer with the norm gains and the stream scale folded into its weights."""

    def __init__(self, layer: EncoderLayer, d: torch.Tensor):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = layer.num_heads, layer.num_kv, layer.head_dim
        eps = layer.input_norm.eps
        d = d.double()
        g_in = layer.input_norm.gain.double() / d
        self.norm_stream = MeanSquareNorm(d, eps)
        self.q_proj = _lin(layer.q_proj.weight.double() * g_in)
        self.k_proj = _lin(layer.k_proj.weight.double() * g_in)
        self.v_proj = _lin(layer.v_proj.weight.double() * g_in)
        self.q_norm, self.k_norm = HeadNorm(layer.q_norm), HeadNorm(layer.k_norm)
        g_pa = layer.post_attn_norm.gain.double() * d
        self.o_proj = _lin(layer.o_proj.weight)
        self.norm_attn = GainNorm(g_pa, eps)
        g_ff = layer.pre_ff_norm.gain.double() / d
        self.gate_proj = _lin(layer.gate_proj.weight.double() * g_ff)
        self.up_proj = _lin(layer.up_proj.weight.double() * g_ff)
        g_pf = layer.post_ff_norm.gain.double() * d
        self.down_proj = _lin(layer.down_proj.weight)
        self.norm_mlp = GainNorm(g_pf, eps)

    def attention(self, h: torch.Tensor, rope: tuple[torch.Tensor, ...], keep: torch.Tensor,
                  drop: torch.Tensor) -> torch.Tensor:
        cos, sin, cos_q, sin_q = rope
        hd, heads, kv = self.head_dim, self.num_heads, self.num_kv
        seq = h.shape[0]
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if kv == 1:  # every query head against the one KV head: one op each, rows t*H + h
            keys = _rope(self.k_norm(k), cos, sin).transpose(0, 1)
            q_all = _rope(self.q_norm(q.reshape(seq * heads, hd)), cos_q, sin_q)
            scores = (q_all @ keys).reshape(seq, heads, seq) * keep.unsqueeze(1) \
                + drop.unsqueeze(1)
            probs = torch.softmax(scores, dim=-1).reshape(seq * heads, seq)
            return self.o_proj((probs @ v).reshape(seq, heads * hd))
        group = heads // kv
        outs = []
        for i in range(heads):
            g = i // group
            k_g = _rope(self.k_norm(k[:, g * hd:(g + 1) * hd]), cos, sin)
            q_i = _rope(self.q_norm(q[:, i * hd:(i + 1) * hd]), cos, sin)
            scores = (q_i @ k_g.transpose(0, 1)) * keep + drop
            outs.append(torch.softmax(scores, dim=-1) @ v[:, g * hd:(g + 1) * hd])
        return self.o_proj(torch.cat(outs, dim=-1))

    def forward(self, r: torch.Tensor, rope: tuple[torch.Tensor, ...], keep: torch.Tensor,
                drop: torch.Tensor) -> torch.Tensor:
        r = r + self.norm_attn(self.attention(self.norm_stream(r), rope, keep, drop))
        h = self.norm_stream(r)
        mlp = self.down_proj(nn.functional.gelu(self.gate_proj(h), approximate="tanh")
                             * self.up_proj(h))
        return r + self.norm_mlp(mlp)


class Int8Core(nn.Module):
    """Folded weights shared by every bucket (built once from an EncoderCore).

    absmax: per-channel max |x| of the float residual stream (``stream_statistics``);
    ``None`` means no flattening (d = 1), used to measure the stream itself.
    output_rms: typical RMS of the projection, divided out of the last Dense layer.
    """

    def __init__(self, core: EncoderCore, absmax: Optional[torch.Tensor] = None,
                 beta: float = 1.0, output_rms: Optional[float] = None,
                 pad_rms: float = 0.03):
        super().__init__()
        self.spec = core.spec
        hidden = core.spec.hidden_size
        d = stream_scale(absmax, beta) if absmax is not None else torch.ones(hidden)
        self.register_buffer("stream_scale", d)
        self.entry = _lin(torch.diag(d.double() * core.spec.embed_scale))
        # stands in for padding rows (see Int8BucketEncoder.forward): a flat row with the
        # typical RMS of an embedding-table row
        self.register_buffer("pad_row", torch.full((hidden,), pad_rms))
        self.layers = nn.ModuleList(Int8Layer(layer, d) for layer in core.layers)
        self.final_norm = MeanSquareNorm(d, core.final_norm.eps)
        self.dense_has_bias = core.dense_has_bias
        g_f = core.final_norm.gain.double() / d.double()
        dense = []
        for i, old in enumerate(core.dense):
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
            w = old.weight.detach().double()
            if i == 0:
                w = w * g_f  # the final norm's gain (and 1/d) commute with the pooling sum
            if i == len(core.dense) - 1 and output_rms and not self.dense_has_bias:
                w = w / output_rms
            new.weight = nn.Parameter(w.float(), requires_grad=False)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            dense.append(new)
        self.dense = nn.ModuleList(dense)
        self.final_gain = None
        if not dense:
            self.final_gain = nn.Parameter(g_f.float(), requires_grad=False)


class Int8BucketEncoder(nn.Module):
    """Same signature and output as BucketEncoder; int8-friendly ops and ranges."""

    def __init__(self, icore: Int8Core, seq_len: int,
                 mask_penalty: float = DEFAULT_INT8_MASK_PENALTY, l2_eps: float = 1e-3):
        super().__init__()
        self.core = icore
        self.seq_len = seq_len
        self.mask_penalty = mask_penalty
        self.l2_eps = l2_eps
        spec = icore.spec
        self.is_sliding = [t == "sliding_attention" for t in spec.layer_types]
        half = spec.head_dim // 2
        for name, theta in (("global", spec.rope_theta_global), ("local", spec.rope_theta_local)):
            cos, sin = rope_tables(seq_len, spec.head_dim, theta)
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)
            self.register_buffer(f"cosq_{name}", cos.repeat_interleave(spec.num_heads, 0),
                                 persistent=False)
            self.register_buffer(f"sinq_{name}", sin.repeat_interleave(spec.num_heads, 0),
                                 persistent=False)
        self.needs_band = any(self.is_sliding) and spec.window_radius < seq_len
        self.register_buffer("band", band_bias(seq_len, spec.window_radius, 1.0) + 1.0,
                             persistent=False)  # 1 inside the window, 0 outside
        self.record: Optional[list[torch.Tensor]] = None  # stream taps (statistics only)

    def _rope(self, name: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{k}_{name}") for k in ("cos", "sin", "cosq", "sinq"))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor,
                pool: torch.Tensor) -> torch.Tensor:
        core = self.core
        p = pool[0]
        # Padding rows are all-zero: their norms would be rsqrt(eps) ~ 1e3 and set every
        # rsqrt's int8 range. Give them a typical row instead (never pooled, never seen by
        # real tokens through the mask, so exact for the output).
        padding = 1.0 - p.sum(0)
        r = core.entry(embeddings[0] + padding.unsqueeze(-1) * core.pad_row)
        keep_full = mask[0]
        drop_full = (keep_full - 1.0) * self.mask_penalty
        keep_local, drop_local = keep_full, drop_full
        if self.needs_band:
            keep_local = keep_full * self.band
            drop_local = (keep_local - 1.0) * self.mask_penalty
        local, glob = self._rope("local"), self._rope("global")
        for layer, sliding in zip(core.layers, self.is_sliding):
            if self.record is not None:
                self.record.append(r)
            if sliding:
                r = layer(r, local, keep_local, drop_local)
            else:
                r = layer(r, glob, keep_full, drop_full)
        if self.record is not None:
            self.record.append(r)
        h = core.final_norm(r)
        if core.final_gain is not None:
            h = h * core.final_gain
        count = p.sum(-1, keepdim=True)
        if core.dense_has_bias:
            weights = p / torch.clamp(count, min=1.0)
        else:
            weights = p * torch.rsqrt(count + 1.0)
        pooled = weights @ h
        for dense in core.dense:
            pooled = dense(pooled)
        if not core.dense_has_bias:
            # an empty slot would give rsqrt(0 + eps), owning the rsqrt's int8 range: give it
            # a flat unit-RMS vector instead (live slots have count >= 1: exact for them)
            pooled = pooled + torch.relu(1.0 - count)
        if self.record is not None:
            self.record.append(pooled[count[:, 0] > 0])
        norm = torch.rsqrt((pooled * pooled).sum(-1, keepdim=True) + self.l2_eps)
        return (pooled * norm).unsqueeze(0)


@torch.no_grad()
def stream_statistics(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]]
                      ) -> tuple[torch.Tensor, float]:
    """(per-channel max |x| of the residual stream, median projection RMS) in float.

    One pass of the unflattened rewrite (d = 1) over calibration inputs.
    """
    plain = Int8Core(core).eval()
    encoders: dict[int, Int8BucketEncoder] = {}
    amax = torch.zeros(core.spec.hidden_size)
    rms = []
    for s in samples:
        t = int(s["embeddings"].shape[1])
        enc = encoders.setdefault(t, Int8BucketEncoder(plain, t).eval())
        enc.record = []
        enc(torch.from_numpy(s["embeddings"]), torch.from_numpy(s["mask"]),
            torch.from_numpy(s["pool"]))
        *stream, pooled = enc.record
        enc.record = None
        for r in stream:
            amax = torch.maximum(amax, r.abs().amax(0))
        rms.append(pooled.pow(2).mean(-1).sqrt())
    return amax, float(torch.cat(rms).median())


def build_int8_core(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]],
                    beta: float = 1.0) -> Int8Core:
    """Measure the stream on calibration inputs and fold everything (float, exact)."""
    absmax, rms = stream_statistics(core, samples)
    return Int8Core(core, absmax, beta, rms).eval()
