"""The host's part of the segmented encoder in torch: the loop around the segments.

``host_forward`` is what the device runs in numpy (device/segment_host.py) between the
segment graphs: the residual stream in float, the RMSNorms, pooling, the Dense head and
the L2 norm, with ``run(layer, kind, input, mask)`` computing each segment (the torch
modules, the encoder's own float layers, or int8 graphs). ``check_float`` proves the
segments' rewrite exact in float before anything is quantised.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from gemma_edge.errors import QuantizationError

from ..coral_ops import DEFAULT_MAX_PRODUCT
from ..encoder import BucketEncoder, EncoderCore, EncoderSpec
from .modules import AttentionSegment, LayerScales, MlpSegment, _t
from .split_attention import QKV, SplitAttentionSegment

FLOAT_EQUALITY = 0.99999  # min cosine of the segmented rewrite to BucketEncoder in float


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
    """Each layer's (attention, MLP) segment modules for one bucket: the attention an
    ``AttentionSegment`` (one int8 graph) or, in buckets of at most
    ``host_attention_upto`` tokens, a ``SplitAttentionSegment`` (two graphs, the core on
    the host)."""
    spec = core.spec
    out = []
    for i, layer in enumerate(core.layers):
        sliding, theta = layer_attention(spec, i)
        attn: nn.Module
        if seq_len <= scales[i].host_attention_upto:
            attn = SplitAttentionSegment(layer, seq_len, sliding, spec.window_radius, theta,
                                         scales[i])
        else:
            attn = AttentionSegment(layer, seq_len, sliding, spec.window_radius, theta,
                                    scales[i], max_product)
        out.append((attn.eval(), MlpSegment(layer, scales[i]).eval()))
    return out


def layer_attention(spec: EncoderSpec, layer: int) -> tuple[bool, float]:
    """(sliding window?, RoPE base) of one layer's attention."""
    sliding = spec.layer_types[layer] == "sliding_attention"
    return sliding, spec.rope_theta_local if sliding else spec.rope_theta_global


def graph_parts(pair: tuple[nn.Module, MlpSegment]) -> list[tuple[str, nn.Module]]:
    """The graphs of one layer, (kind, module) in the order the device runs them:
    attn, mlp; or attn_qkv, attn_o, mlp where the attention is split."""
    attn, mlp = pair
    if isinstance(attn, SplitAttentionSegment):
        return [*attn.parts(), ("mlp", mlp)]
    return [("attn", attn), ("mlp", mlp)]


def part_feeds(pair: tuple[nn.Module, MlpSegment], kind: str,
               attn_feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """A split attention's part's calibration inputs from the attention's ({a, mask}):
    the qkv segment takes ``a``, the o segment what the float host core makes of it."""
    attn = pair[0]
    if not isinstance(attn, SplitAttentionSegment):
        raise ValueError(f"{kind}: not a part of a split attention")
    if kind == QKV:
        return [{"b": f["a"]} for f in attn_feeds]
    with torch.no_grad():
        return [{"b": attn.core(attn.qkv(torch.from_numpy(f["a"])),
                                torch.from_numpy(f["mask"])).numpy()} for f in attn_feeds]


def torch_runner(segments: Sequence[tuple[nn.Module, MlpSegment]]) -> SegmentFn:
    def run(i: int, kind: str, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        attn, mlp = segments[i]
        return attn(x, mask) if kind == "attn" else mlp(x)
    return run


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


def sample_tensors(sample: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """A graph-input dict as the (embeddings, mask, pool) tensors the encoders take."""
    return [torch.from_numpy(sample[k]) for k in ("embeddings", "mask", "pool")]


@torch.no_grad()
def check_float(core: EncoderCore, scales: Sequence[LayerScales],
                segments: Sequence[tuple[nn.Module, MlpSegment]],
                samples: Sequence[dict[str, np.ndarray]]) -> float:
    """Min cosine (live pooling slots) of host loop + float segments to BucketEncoder."""
    worst = 1.0
    run = torch_runner(segments)
    for sample in samples:
        args = sample_tensors(sample)
        reference = BucketEncoder(core, args[0].shape[1]).eval()(*args)[0]
        ours = host_forward(core, scales, run, *args)[0]
        live = args[2][0].sum(-1) > 0
        cos = nn.functional.cosine_similarity(reference[live], ours[live], dim=-1)
        worst = float(np.minimum(worst, float(cos.min())))  # np.minimum keeps a NaN
    if not worst >= FLOAT_EQUALITY:  # written so that NaN fails
        raise QuantizationError(f"segmented rewrite differs from the float encoder "
                                f"(cosine {worst:.6f} < {FLOAT_EQUALITY})")
    return worst
