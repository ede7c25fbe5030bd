"""Where an export's full-int8 segments lose: each int8 segment against its float one.

``gemma-edge eval --sensitivity --sensitivity-precision full-int8`` runs it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..encoder import EncoderCore
from .build import scales_from_host
from .host import host_forward, layer_segments, sample_tensors, torch_runner


@torch.no_grad()
def segment_sensitivity(core: EncoderCore, art_dir: Path, graph: dict,
                        samples: Sequence[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Error each int8 segment adds: its output vs the float segment on the same input.

    Inputs come from the float host loop (so errors do not compound); reported as
    SNR in dB over the tokens that belong to a text.
    """
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.device.segment_host import SegmentRunner
    from gemma_edge.graph_entries import GraphEntry

    seq_len = int(graph["seq_lens"][0])
    runner = SegmentRunner(art_dir, GraphEntry.from_json(graph), seq_len,
                             lambda path: Interpreter(model_path=str(path), num_threads=2))
    scales = scales_from_host(runner.host)
    float_run = torch_runner(layer_segments(core, seq_len, scales))
    errors: dict[str, list[float]] = {}
    for sample in samples:
        live = torch.from_numpy(sample["pool"][0]).sum(0) > 0

        def run(i: int, kind: str, x: torch.Tensor, mask: Optional[torch.Tensor],
                live: torch.Tensor = live, sample: dict = sample) -> torch.Tensor:
            ref = float_run(i, kind, x, mask)
            if kind == "attn":  # one graph, or a split attention's two and its host core
                out = runner.attend(i, x.numpy(), sample["mask"])
            else:
                out = runner.segments[runner.per_layer * (i + 1) - 1](x.numpy())
            got = torch.from_numpy(out.reshape(ref.shape))
            # the branch output as the host uses it: partials ([1, G, T, C]: the MLP's
            # two ranges) scaled per channel and added
            weight = torch.from_numpy(np.asarray(
                scales[i].ff_out if kind == "mlp" else scales[i].attn_out, np.float64)
            ).reshape(-1, 1, ref.shape[-1])
            r = (ref[0].double() * weight).sum(0)[live]
            g = (got[0].double() * weight).sum(0)[live]
            noise = float((g - r).pow(2).sum()) or 1e-30
            errors.setdefault(f"layer {i:02d} / {kind}", []).append(
                10.0 * math.log10(float(r.pow(2).sum()) / noise))
            return ref

        host_forward(core, scales, run, *sample_tensors(sample))
    return {key: {"mean_snr_db": float(np.mean(v)), "min_snr_db": float(np.min(v)),
                  "tensors": len(v)} for key, v in sorted(errors.items())}
