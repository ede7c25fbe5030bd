"""Calibration of the segments: per-channel scales from float runs, and each segment's
int8 calibration inputs as the host computes them.

Corpus samples only (``export.calibration``), never the held-out set. Layer i's scales
depend only on the layers before it being exact, so one float pass with identity scales
collects every absmax.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from gemma_edge.errors import QuantizationError

from ..encoder import BucketEncoder, EncoderCore
from .host import reference_forward
from .modules import LayerScales, _t
from .recipe import DEFAULT_RECIPE, SegmentRecipe


def smooth(act_absmax: torch.Tensor, weight_colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's migration scale s = A^alpha / W^(1 - alpha) (activation /= s)."""
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_colmax.double().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).float()


@torch.no_grad()
def measure_scales(core: EncoderCore, samples: Sequence[dict[str, np.ndarray]],
                   recipe: SegmentRecipe = DEFAULT_RECIPE) -> list[LayerScales]:
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
                         recipe.act) for i, layer in enumerate(core.layers)]
    # the product's absmax after smoothing sets where its fine tensor saturates
    splits = [recipe.mlp_split * float((stats[(i, "act")] / act_scales[i]).max())
              if recipe.mlp_split > 0.0 else 0.0 for i in range(n)]
    if recipe.mlp_host_sum and max(splits) > 0.0:
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
        attn_in = smooth(stats[(i, "attn_in")], w_qkv.abs().amax(0), recipe.attn_in)
        w_gu = layer.gate_up_proj.weight.detach() * layer.pre_ff_norm.gain.detach()
        ff_in = smooth(stats[(i, "ff_in")], w_gu.abs().amax(0), recipe.ff_in)
        w_o = layer.o_proj.weight.detach().abs().reshape(c, spec.num_heads, hd).amax((0, 1))
        v = smooth(stats[(i, "v")], w_o, recipe.v)
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
                               softmax_split=recipe.softmax_split,
                               softmax_split_from=recipe.softmax_split_from,
                               v_abs=stats[(i, "v")].clamp(min=1e-6).numpy().astype(np.float32),
                               host_attention_upto=recipe.host_attention_upto))
    if not all(np.isfinite(v).all() for s in out for v in vars(s).values() if v is not None):
        raise QuantizationError("per-channel scales are not finite: the float encoder "
                                "produced inf/NaN on the calibration inputs")
    return out


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
