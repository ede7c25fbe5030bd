"""Pre-flight of the full-int8 segments: one bucket's per-layer segments as one workload.

The export writes the Edge TPU role as 48 co-compiled segments per bucket plus host
constants (export/segments/); this module lists their files and sums the mapper's
per-segment reports into the bucket's totals, adding the MACs the host does outside
every graph (pooling, the Dense head, and in the short buckets the attention core).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_edge.graph_entries import GraphEntry


def graph_files(graph: dict[str, Any]) -> list[str]:
    """The TFLite files of a manifest graph entry: one, or the per-layer segments."""
    return GraphEntry.from_json(graph).graph_files


def segmented_summary(art: Path, graph: dict[str, Any], reports: list[dict[str, Any]]
                      ) -> dict[str, Any]:
    """One bucket of the segmented export: its co-compiled segments plus the host's MACs."""
    import numpy as np

    from .estimate import cocompiled_summary

    entry = GraphEntry.from_json(graph)
    seq, slots = entry.seq_lens[0], entry.pool_slots
    host_macs = 0
    with np.load(art / entry.path) as host:
        hidden = int(host["final_gain"].shape[0])
        host_macs += slots * seq * hidden  # pooling
        for k in range(int(host["dense_count"])):
            host_macs += slots * int(np.prod(host[f"dense_{k}_weight"].shape))
        layers = len(host["attn_in"])
        if len(entry.segments) == 3 * layers and "num_heads" in host:
            # split attention (export/segments/split_attention.py): per layer the host
            # computes the scores and the weights x V, 2 H T^2 D multiply-adds
            heads, hd = int(host["num_heads"]), int(host["head_dim"])
            host_macs += layers * 2 * heads * seq * seq * hd
    return cocompiled_summary(reports, host_macs)
