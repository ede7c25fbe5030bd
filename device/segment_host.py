"""The host loop of the full-int8 segments (export/segments/ says why they exist).

Each layer is two fully int8 graphs (attention, MLP) that run on the Edge TPU
(or the CPU interpreter, emulating it), or three in the short buckets, whose attention
core the host computes between its two projections (host_attention.py); between them
this loop keeps the residual stream in float32 and applies the RMSNorms, then pools,
runs the Dense head and L2-normalises. numpy only: it runs on a Coral Dev Board.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from gemma_edge.errors import ArtifactError
from gemma_edge.graph_entries import GraphEntry

from .host_attention import HostAttention, rms
from .runtime import dequantize_output, quantize_input


def _blas_controller() -> Any:
    """A threadpoolctl controller of the BLAS libraries numpy loaded (made once: finding
    them walks the process's libraries; each ``limit`` then costs ~10 us)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class SegmentGraph:
    """One segment's interpreter: float in, float out, int8 at its boundary."""

    def __init__(self, interpreter: Any, path: str):
        interpreter.allocate_tensors()
        self.interpreter = interpreter
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(outputs) != 1 or len(inputs) not in (1, 2):
            raise ArtifactError(f"{path}: {len(inputs)} inputs / {len(outputs)} outputs; "
                                "not a gemma-edge segment, re-export")
        # by rank (edgetpu_compiler renames tensors): a [1, 1, T, C]; mask [1, T, T]
        self.a = next(d for d in inputs if len(d["shape"]) == 4)
        self.mask = next((d for d in inputs if len(d["shape"]) == 3), None)
        self.out = outputs[0]

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        interp = self.interpreter
        interp.set_tensor(self.a["index"], quantize_input(x.reshape(self.a["shape"]), self.a))
        if self.mask is not None and mask is not None:
            interp.set_tensor(self.mask["index"], quantize_input(mask, self.mask))
        interp.invoke()
        return dequantize_output(interp.get_tensor(self.out["index"]), self.out)


class SegmentRunner:
    """One bucket's segments and the host loop around them: a ``graphs.Runner``,
    ``run(embeddings, mask, pool) -> [S, D]`` like ``runtime.GraphRunner``."""

    def __init__(self, art_dir: Path, entry: GraphEntry, seq_len: int,
                 open_graph: Callable[[Path], Any]):
        self.seq_len = seq_len
        self.slots = entry.pool_slots
        try:
            with np.load(Path(art_dir) / entry.path) as host:
                self.host = {k: host[k] for k in host.files}
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{Path(art_dir) / entry.path}: cannot read the segment "
                                f"constants ({exc}); re-export") from exc
        layers = len(self.host["attn_in"])
        # per layer: attention + MLP, or (split attention) qkv + o + MLP with the
        # attention core on the host (device/host_attention.py)
        self.per_layer = len(entry.segments) // max(layers, 1)
        if self.per_layer not in (2, 3) or len(entry.segments) != self.per_layer * layers:
            raise ArtifactError(f"manifest lists {len(entry.segments)} segments for {layers} "
                                "layers")
        self.attention = (HostAttention(self.host, seq_len, str(Path(art_dir) / entry.path))
                          if self.per_layer == 3 else None)
        self.segments = [SegmentGraph(open_graph(Path(art_dir) / f), f) for f in entry.segments]
        self._blas = _blas_controller()

    def run(self, embeddings: np.ndarray, mask: np.ndarray, pool: np.ndarray) -> np.ndarray:
        # The host's matmuls (the split attention's scores and weights x V, pooling, the
        # Dense head) are small and sit between interpreter calls whose threads are still
        # spinning: with BLAS threads on top, a 64-token call took 7.0 s instead of 0.86 s
        # on a loaded 2-core machine (1.8 ms per layer's products single-threaded, 77 ms
        # multi-threaded; a one-off timing script, 2026-12-07). threadpoolctl caps the
        # BLAS pool for the call only.
        with self._blas.limit(limits=1, user_api="blas"):
            return self._run(embeddings, mask, pool)

    def attend(self, layer: int, a: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Layer ``layer``'s attention output as its segments give it (before attn_out)."""
        if self.attention is None:
            return self.segments[2 * layer](a, mask)
        qkv = self.segments[3 * layer](a)
        return self.segments[3 * layer + 1](self.attention.core(layer, qkv, mask))

    def _run(self, embeddings: np.ndarray, mask: np.ndarray, pool: np.ndarray) -> np.ndarray:
        h = self.host
        eps = float(h["eps"])
        x = embeddings[0].astype(np.float32) * h["embed_scale"]
        padding = pool[0].sum(0) == 0
        x[padding] = x[0]  # as in export: a zero row would stretch the int8 ranges
        n = self.per_layer
        for i in range(len(h["attn_in"])):
            mlp = self.segments[n * i + n - 1]
            o = self.attend(i, rms(x, eps) / h["attn_in"][i], mask).reshape(x.shape)
            x = x + rms(o * h["attn_out"][i], eps) * h["post_attn_gain"][i]
            # [C] output scales, or [G, C]: the segment returns G partials (the two
            # ranges of the GELU product) that are added here in float
            ff_out = h["ff_out"][i].reshape(-1, 1, x.shape[-1])
            m = (mlp(rms(x, eps) / h["ff_in"][i]).reshape(len(ff_out), *x.shape)
                 * ff_out).sum(0)
            x = x + rms(m, eps) * h["post_ff_gain"][i]
        x = rms(x, eps) * h["final_gain"]
        pooled = pool[0] @ x
        if int(h["dense_mean"]):
            pooled = pooled / np.maximum(pool[0].sum(-1, keepdims=True), 1e-9)
        for k in range(int(h["dense_count"])):
            pooled = pooled @ h[f"dense_{k}_weight"].T
            if f"dense_{k}_bias" in h:
                pooled = pooled + h[f"dense_{k}_bias"]
        norm = np.sqrt(np.maximum((pooled * pooled).sum(-1, keepdims=True), 1e-24))
        return (pooled / norm).astype(np.float32)
