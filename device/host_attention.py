"""The host's part of a split attention (export/segments/split_attention.py says why).

Between a layer's two int8 projection segments the host computes, in float32, the
q/k RMSNorms, RoPE, the scores, the softmax and the weights x V for the short buckets
(``SegmentRecipe.host_attention_upto``). numpy only: it runs on a Coral Dev Board. The
torch twin the export calibrates and checks with is ``SplitAttentionSegment.core``.
"""

from __future__ import annotations

import numpy as np

from gemma_edge.errors import ArtifactError

MASK_PENALTY = 1.0e4  # as the encoder's DEFAULT_MASK_PENALTY: exp(-1e4) == 0 in float32
_KEYS = ("q_norm_gain", "k_norm_gain", "q_scale", "k_scale", "v_abs", "v_scale",
         "rope_theta", "window_radius", "num_heads", "head_dim", "eps")


class HostAttention:
    """One bucket's host attention cores, every layer: ``core(layer, qkv, mask)``."""

    def __init__(self, host: dict[str, np.ndarray], seq_len: int, path: str):
        missing = [k for k in _KEYS if k not in host]
        if missing:
            raise ArtifactError(f"{path}: no {', '.join(missing)} for the split attention; "
                                "re-export")
        self.heads, self.hd = int(host["num_heads"]), int(host["head_dim"])
        self.seq_len, self.eps = seq_len, float(host["eps"])
        self.q_gain = host["q_norm_gain"].astype(np.float32)
        self.k_gain = host["k_norm_gain"].astype(np.float32)
        # the qkv segment's channel divisors: q's, k's and v's calibrated absmax
        self.u = np.concatenate([host["q_scale"], host["k_scale"], host["v_abs"]],
                                -1).astype(np.float32)
        self.s_o = np.tile(host["v_scale"].astype(np.float32), (1, self.heads))
        self.window = host["window_radius"].astype(np.int64)
        thetas = host["rope_theta"].astype(np.float64)
        self._rope = {float(t): _rope_tables(seq_len, self.hd, float(t)) for t in set(thetas)}
        self.theta = [float(t) for t in thetas]

    def core(self, layer: int, qkv: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """qkv segment output [T, (H+2) D] (float, as dequantised) and the 0/1 mask
        [1, T, T] -> the o segment's input [T, H D]."""
        seq, heads, hd = self.seq_len, self.heads, self.hd
        x = qkv.reshape(seq, -1) * self.u[layer]
        q = x[:, :heads * hd].reshape(seq, heads, hd).transpose(1, 0, 2)   # [H, T, D]
        k, v = x[:, heads * hd:(heads + 1) * hd], x[:, (heads + 1) * hd:]
        cos, sin = self._rope[self.theta[layer]]
        q = _rope(rms(q, self.eps) * self.q_gain[layer], cos, sin)
        k = _rope(rms(k, self.eps) * self.k_gain[layer], cos, sin)
        bias = (mask.reshape(seq, seq).astype(np.float32) - 1.0) * MASK_PENALTY
        radius = int(self.window[layer])
        if 0 < radius < seq:
            idx = np.arange(seq)
            bias = bias - MASK_PENALTY * (np.abs(idx[:, None] - idx[None, :]) >= radius)
        scores = q @ k.T + bias                                            # [H, T, T]
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        o = (probs @ v).transpose(1, 0, 2).reshape(seq, heads * hd)
        return (o / self.s_o[layer]).astype(np.float32)


def rms(x: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) over the last axis (the host loop's RMSNorms, without their gain)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope_tables(seq_len: int, hd: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and the sign-folded sin [T, D], computed as transformers does (float32)."""
    inv_freq = (1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
                ).astype(np.float32)
    freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], -1)
    half = hd // 2
    sin = np.sin(emb)
    return np.cos(emb), np.concatenate([-sin[:, :half], sin[:, half:]], -1)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([x[..., half:], x[..., :half]], -1) * sin
