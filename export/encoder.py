"""An export-friendly PyTorch re-implementation of the EmbeddingGemma encoder.

Why not convert ``transformers``' Gemma3 model directly: with litert-torch 0.10
its attention converts wrongly (cosine 0.23 to PyTorch on one block, 0.20 for
the whole model) and PT2E cannot trace it. This module computes the same
function with ops that convert exactly:

- the token-embedding lookup stays on the host (the 262144 x 768 table is 805 MB
  in float32; the device reads the rows it needs from disk, device/table.py), so the
  graph starts from embedding rows;
- attention is written per head with plain matmuls and an *additive* bias built
  from a 0/1 visibility mask input (no boolean ops, no -inf);
- RoPE cos/sin tables and the sliding-window band are constants per bucket;
- RMSNorm gains (1 + w) and the 1/sqrt(query_pre_attn_scalar) score scale are
  folded into constants.

Graph signature for a bucket of T tokens and S pooling slots:
    embeddings [1, T, H] float32   raw rows of the token-embedding table
    mask       [1, T, T] float32   1 where query i may attend key j (padding, packing)
    pool       [1, S, T] float32   1 where token t belongs to text s
    -> embedding [1, S, D] float32, L2-normalised (all-zero for an empty slot)

Mean pooling is a plain sum when no Dense layer has a bias: the final L2
normalisation cancels the 1/n, and 0/1 pooling inputs quantise exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from gemma_edge.errors import CheckpointError

DEFAULT_MASK_PENALTY = 1.0e4  # exp(-1e4) == 0 in float32: exact masking, no -inf arithmetic


@dataclass(frozen=True)
class EncoderSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    window_radius: int  # sliding layers see keys with |i - j| < window_radius
    rope_theta_global: float
    rope_theta_local: float
    rms_eps: float
    query_pre_attn_scalar: float
    vocab_size: int

    @property
    def embed_scale(self) -> float:
        # transformers keeps sqrt(hidden) as a float32 buffer; match its rounding.
        return float(torch.tensor(self.hidden_size**0.5, dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> EncoderSpec:
        """Read a Gemma3 text ``config.json`` (transformers 4.5x or 5.x spelling)."""
        n_layers = int(cfg["num_hidden_layers"])
        layer_types = cfg.get("layer_types")
        if not layer_types:
            pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(n_layers)]
        rope_params = cfg.get("rope_parameters") or {}
        if "full_attention" in rope_params:
            theta_global = rope_params["full_attention"].get("rope_theta", 1e6)
            theta_local = rope_params.get("sliding_attention", {}).get("rope_theta", 1e4)
            scaling = rope_params["full_attention"].get("rope_type", "default")
        else:
            theta_global = cfg.get("rope_theta", 1e6)
            theta_local = cfg.get("rope_local_base_freq", 1e4)
            scaling = (cfg.get("rope_scaling") or {}).get("rope_type", "default")
        if scaling != "default":
            raise CheckpointError(f"rope scaling {scaling!r} is not supported")
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            raise CheckpointError("logit soft-capping is not supported (EmbeddingGemma has none)")
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise CheckpointError(f"activation {cfg.get('hidden_activation')!r} is not supported")
        window = int(cfg.get("sliding_window") or 0)
        # transformers turns the saved window W of a bidirectional Gemma3 into the exclusive
        # radius W // 2 + 1 (Gemma3TextConfig.__init__): window 512 -> |i - j| < 257.
        radius = window // 2 + 1 if window else 1 << 30
        spec = cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=n_layers,
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg["num_key_value_heads"]),
            head_dim=int(cfg["head_dim"]),
            layer_types=tuple(layer_types[:n_layers]),
            window_radius=radius,
            rope_theta_global=float(theta_global),
            rope_theta_local=float(theta_local),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", cfg["head_dim"])),
            vocab_size=int(cfg["vocab_size"]),
        )
        if spec.num_heads % spec.num_kv_heads or spec.head_dim % 2:
            raise CheckpointError(f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads / "
                                  f"head_dim {spec.head_dim}: unsupported attention shape")
        return spec


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim], computed in float32 the way transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = pos[:, None] @ inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def band_bias(seq_len: int, radius: int, penalty: float) -> torch.Tensor:
    idx = torch.arange(seq_len)
    inside = (idx[:, None] - idx[None, :]).abs() < radius
    return torch.where(inside, 0.0, -penalty).to(torch.float32)


class RopeTables(NamedTuple):
    """cos and sign-folded sin [T, D] for the keys, and the same as [T, 1, D] for the queries.

    The query tables broadcast over the heads instead of being repeated per head: a
    third of the constant bytes per bucket (the one-file int8 export holds every
    bucket's tables, and they are read on every call).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    cos_q: torch.Tensor
    sin_q: torch.Tensor


def rope_for_heads(seq_len: int, head_dim: int, theta: float, kv_heads: int = 1) -> RopeTables:
    cos, sin = rope_tables(seq_len, head_dim, theta)
    half = head_dim // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half's sign
    return RopeTables(cos.repeat_interleave(kv_heads, 0), sin.repeat_interleave(kv_heads, 0),
                      cos[:, None, :].contiguous(), sin[:, None, :].contiguous())


class RMSNorm(nn.Module):
    """Gemma RMSNorm with the (1 + w) gain folded into one constant."""

    def __init__(self, weight: torch.Tensor, eps: float, extra_scale: float = 1.0):
        super().__init__()
        self.gain = nn.Parameter((1.0 + weight.float()) * extra_scale, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.float().contiguous(), requires_grad=False)
    return layer


class EncoderLayer(nn.Module):
    def __init__(self, spec: EncoderSpec, sd: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        eps, hd = spec.rms_eps, spec.head_dim
        self.num_heads, self.num_kv, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.input_norm = RMSNorm(sd[prefix + "input_layernorm.weight"], eps)
        self.post_attn_norm = RMSNorm(sd[prefix + "post_attention_layernorm.weight"], eps)
        self.pre_ff_norm = RMSNorm(sd[prefix + "pre_feedforward_layernorm.weight"], eps)
        self.post_ff_norm = RMSNorm(sd[prefix + "post_feedforward_layernorm.weight"], eps)
        # The score scale 1/sqrt(query_pre_attn_scalar) rides on the query norm's gain.
        self.q_norm = RMSNorm(sd[prefix + "self_attn.q_norm.weight"], eps,
                              spec.query_pre_attn_scalar**-0.5)
        self.k_norm = RMSNorm(sd[prefix + "self_attn.k_norm.weight"], eps)
        self.q_proj = _linear(sd[prefix + "self_attn.q_proj.weight"])
        self.k_proj = _linear(sd[prefix + "self_attn.k_proj.weight"])
        self.v_proj = _linear(sd[prefix + "self_attn.v_proj.weight"])
        self.o_proj = _linear(sd[prefix + "self_attn.o_proj.weight"])
        self.gate_proj = _linear(sd[prefix + "mlp.gate_proj.weight"])
        self.up_proj = _linear(sd[prefix + "mlp.up_proj.weight"])
        self.down_proj = _linear(sd[prefix + "mlp.down_proj.weight"])

        # Fused projections: one FULLY_CONNECTED instead of three (q, k, v) and two (gate,
        # up). Same weights, same function; half the ops, which dominate at short lengths.
        self.qkv_proj = _linear(torch.cat([self.q_proj.weight, self.k_proj.weight,
                                           self.v_proj.weight]))
        self.gate_up_proj = _linear(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        self.intermediate = self.gate_proj.weight.shape[0]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, with rotate_half's sign folded into the sin table."""
        half = self.head_dim // 2
        return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin_signed

    def attention(self, h: torch.Tensor, rope: RopeTables, bias: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention with the heads as a batch dimension.

        Queries ``[H, T, D]`` against keys ``[1, D, T]`` (EmbeddingGemma's single KV
        head, broadcast over the heads): one BATCH_MATMUL each for QK^T and PV. Why:
        written as one ``[T*H, D] @ [D, T]`` product (or with a leading batch of 1) the
        converter lowers QK^T to a FULLY_CONNECTED with non-constant weights, which
        XNNPACK does not take; the built-in kernel spent ~100 of the int8 graph's 178
        ms at 256 tokens there (measured, docs/quantization.md). As a batched matmul it
        stays inside the XNNPACK partition: 91 ms.
        """
        return self.o_proj(self.attention_heads(h, rope, bias))

    def attention_heads(self, h: torch.Tensor, rope: RopeTables, bias: torch.Tensor
                        ) -> torch.Tensor:
        """The attention up to o_proj's input ``[T, H * D]`` (the heads concatenated)."""
        hd, heads, kv = self.head_dim, self.num_heads, self.num_kv
        group, seq = heads // kv, h.shape[0]
        qkv = self.qkv_proj(h)
        q = qkv[:, :heads * hd]
        k = qkv[:, heads * hd:(heads + kv) * hd]
        v = qkv[:, (heads + kv) * hd:]
        # Norms and RoPE on [T, H, D] / [T*KV, D]: one op each for all heads.
        q = self._rope(self.q_norm(q.reshape(seq, heads, hd)), rope.cos_q, rope.sin_q)
        k = self._rope(self.k_norm(k.reshape(seq * kv, hd)), rope.cos, rope.sin)
        q = q.permute(1, 0, 2)                                             # [H, T, D]
        keys = k.reshape(seq, kv, hd).permute(1, 2, 0)                    # [KV, D, T]
        values = v.reshape(seq, kv, hd).permute(1, 0, 2)                  # [KV, T, D]
        if kv > 1:  # one KV head per query head; with a single KV head the batch broadcasts
            keys = keys.repeat_interleave(group, 0)
            values = values.repeat_interleave(group, 0)
        probs = torch.softmax(torch.matmul(q, keys) + bias, dim=-1)       # [H, T, T]
        out = torch.matmul(probs, values)                                  # [H, T, D]
        return out.permute(1, 0, 2).reshape(seq, heads * hd)

    def forward(self, x: torch.Tensor, rope: RopeTables, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attention(self.input_norm(x), rope, bias))
        gate_up = self.gate_up_proj(self.pre_ff_norm(x))
        gate, up = gate_up[:, :self.intermediate], gate_up[:, self.intermediate:]
        mlp = self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up)
        return x + self.post_ff_norm(mlp)


class EncoderCore(nn.Module):
    """All weights, shared by every bucket's graph (one copy in a multi-signature file)."""

    def __init__(self, spec: EncoderSpec, state_dict: dict[str, torch.Tensor],
                 dense: Sequence[Any]):
        super().__init__()
        self.spec = spec
        try:
            self.layers = nn.ModuleList(
                EncoderLayer(spec, state_dict, f"layers.{i}.") for i in range(spec.num_layers))
            self.final_norm = RMSNorm(state_dict["norm.weight"], spec.rms_eps)
        except KeyError as exc:
            raise CheckpointError(f"model.safetensors: tensor {exc} missing") from exc
        self.dense = nn.ModuleList(_linear(d.weight, d.bias) for d in dense)
        self.dense_has_bias = any(d.bias is not None for d in dense)


class BucketEncoder(nn.Module):
    """The encoder for one fixed sequence length: constants for T, weights from the core."""

    def __init__(self, core: EncoderCore, seq_len: int,
                 mask_penalty: float = DEFAULT_MASK_PENALTY):
        super().__init__()
        self.core = core
        self.seq_len = seq_len
        self.mask_penalty = mask_penalty
        spec = core.spec
        self.is_sliding = [t == "sliding_attention" for t in spec.layer_types]
        for name, theta in (("global", spec.rope_theta_global), ("local", spec.rope_theta_local)):
            tables = rope_for_heads(seq_len, spec.head_dim, theta, spec.num_kv_heads)
            for field_name, value in zip(RopeTables._fields, tables):
                self.register_buffer(f"{field_name}_{name}", value, persistent=False)
        self.register_buffer("band", band_bias(seq_len, spec.window_radius, mask_penalty),
                             persistent=False)
        self.needs_band = any(self.is_sliding) and spec.window_radius < seq_len
        self.embed_scale = spec.embed_scale

    def layer_inputs(self, mask: torch.Tensor) -> list[tuple[RopeTables, torch.Tensor]]:
        """(RoPE tables, additive attention bias) of every layer for a ``mask [1, T, T]``."""
        bias_full = (mask[0] - 1.0) * self.mask_penalty
        bias_local = bias_full + self.band if self.needs_band else bias_full
        local = RopeTables(*(getattr(self, f"{f}_local") for f in RopeTables._fields))
        glob = RopeTables(*(getattr(self, f"{f}_global") for f in RopeTables._fields))
        return [(local, bias_local) if sliding else (glob, bias_full)
                for sliding in self.is_sliding]

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor,
                pool: torch.Tensor) -> torch.Tensor:
        core = self.core
        x = embeddings[0] * self.embed_scale
        for layer, (rope, bias) in zip(core.layers, self.layer_inputs(mask)):
            x = layer(x, rope, bias)
        x = core.final_norm(x)
        pooled = pool[0] @ x
        if core.dense_has_bias:
            pooled = pooled / torch.clamp(pool[0].sum(-1, keepdim=True), min=1e-9)
        for dense in core.dense:
            pooled = dense(pooled)
        norm = torch.rsqrt(torch.clamp(pooled.pow(2).sum(-1, keepdim=True), min=1e-24))
        return (pooled * norm).unsqueeze(0)


def build_encoder(checkpoint: Any) -> tuple[EncoderCore, torch.Tensor]:
    """(EncoderCore, token-embedding table) from a loaded ``export.checkpoint.Checkpoint``.

    One pass over model.safetensors (1.2 GB for the real model) serves both.
    """
    spec = EncoderSpec.from_config(checkpoint.config)
    sd = checkpoint.state_dict()
    if "embed_tokens.weight" not in sd:
        raise CheckpointError(f"{checkpoint.weights_path}: no embed_tokens.weight tensor")
    table = sd.pop("embed_tokens.weight")
    core = EncoderCore(spec, sd, checkpoint.dense)
    core.eval()
    return core, table
