"""The float TFLite graphs of segments: converted by litert-torch (``float_segment``), or
converted once per bucket and structure and each layer's values written in (templates).

Why templates: the 24 attention (or MLP) segments of a bucket are the same graph with
different constants, yet litert-torch traces, decomposes and lowers each from scratch:
3-14 s per segment up to 256 tokens on the 2-core reference machine (a 256-token attention
segment is ~2,800 traced nodes), 29 s for an attention segment at 512 tokens.
No library rewrites the constants of a converted TFLite graph from another module's
tensors (ai-edge-quantizer and LiteRT's flatbuffer tools edit whole models, and neither
knows which torch tensor became which buffer), so it is done here:

1. a *probe* copy of one segment has every element of every parameter and buffer set to
   its own index (``PROBE_BASE + i``, exact in float32) and is converted once;
2. each float32 constant of the probe graph then reads as the index map from the
   segment's flattened tensors to that buffer, layout changes included (a convolution's
   weights transposed by the converter are a permuted index map); constants that hold no
   indices (zero biases, shapes, the converter's own numbers) are the same for every
   layer and stay;
3. a layer's graph is the probe graph with its buffers overwritten in place by the
   layer's tensors gathered through those maps (same sizes, so no re-serialisation).

A constant the converter computed from tensors (folded arithmetic) would hold
non-index values and be kept wrongly, so every filled graph is checked against the
torch segment on a real input before use, and falls back to a full conversion if it
differs (``fill_checked``). Segments state what else shapes their graph
(``graph_options``); segments with equal options and tensor shapes share a template.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

log = logging.getLogger("gemma_edge.export")

PROBE_BASE = float(2 ** 22)  # probe values PROBE_BASE + i stay exact in float32 below 2**24
_MAX_ELEMENTS = 2 ** 24 - 2 ** 22
TEMPLATE_TOLERANCE = 1e-3  # filled graph vs torch: max abs difference / max abs output


def segment_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a segment, by name (the order of the index space)."""
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return sorted(named.items())


def template_key(module: nn.Module) -> tuple:
    """Segments with equal keys convert to the same graph up to constant values."""
    shapes = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in segment_tensors(module))
    return (module.graph_options(), shapes)


def _flat(module: nn.Module) -> np.ndarray:
    return np.concatenate([t.detach().float().reshape(-1).numpy()
                           for _, t in segment_tensors(module)]).astype(np.float32)


def _probe(module: nn.Module) -> Optional[nn.Module]:
    """A copy whose tensor elements hold their index; None if the index space is too big
    or a tensor is not float32 (its values could not be rewritten by index)."""
    tensors = segment_tensors(module)
    if any(t.dtype != torch.float32 for _, t in tensors):
        return None
    if sum(t.numel() for _, t in tensors) > _MAX_ELEMENTS:
        return None
    probe = copy.deepcopy(module)
    start = 0
    with torch.no_grad():
        for _, tensor in segment_tensors(probe):
            n = tensor.numel()
            tensor.copy_(torch.arange(start, start + n, dtype=torch.float64)
                         .add_(PROBE_BASE).float().reshape(tensor.shape))
            start += n
    return probe


def _float_buffer_regions(graph: bytes) -> list[tuple[int, int]]:
    """(byte offset, float count) of every constant buffer read by a float32 tensor."""
    from ai_edge_litert import schema_py_generated as schema

    from ..quantize import model_tensors

    start = np.frombuffer(graph, np.uint8).__array_interface__["data"][0]
    seen, regions = set(), []
    for root, tensor in model_tensors(graph):
        index = tensor.Buffer()
        if tensor.Type() != schema.TensorType.FLOAT32 or index in seen or index == 0:
            continue
        seen.add(index)
        buffer = root.Buffers(index)
        if buffer.Offset() > 1:  # stored after the flatbuffer
            regions.append((int(buffer.Offset()), int(buffer.Size()) // 4))
        elif buffer.DataLength():
            data = buffer.DataAsNumpy()
            regions.append((data.__array_interface__["data"][0] - start, data.size // 4))
    return regions


class _Seg(nn.Module):
    """Named I/O for the converter (subclasses name the inputs), output ``out``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner


class _AttnSeg(_Seg):
    def forward(self, a: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.inner(a, mask)}


class _MlpSeg(_Seg):
    def forward(self, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.inner(b)}


def _convert_segment(module: nn.Module, sample: dict[str, torch.Tensor]) -> bytes:
    import litert_torch

    from gemma_edge.errors import ConversionError

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return bytes(litert_torch.signature("segment", module.eval(), sample_kwargs=sample)
                         .convert().model_content())
    except Exception as exc:  # noqa: BLE001 - litert-torch raises many types
        raise ConversionError(f"litert-torch could not convert a segment: "
                              f"{type(exc).__name__}: {exc}") from exc


# The wrappers' qualified names are part of every segment graph's tensor names
# (litert-torch names tensors after the module stack): kept from when this module was
# export/segment_graph.py, so the graphs stay byte-identical to earlier exports.
_AttnSeg.__module__ = _MlpSeg.__module__ = "gemma_edge.export.segment_graph"


def float_segment(kind: str, segment: nn.Module, seq_len: int, hidden: int) -> bytes:
    """The float TFLite graph of one segment (signature "segment"), before quantisation."""
    if kind == "attn":
        module: nn.Module = _AttnSeg(segment)
        sample = {"a": torch.zeros(1, 1, seq_len, hidden), "mask": torch.ones(1, seq_len, seq_len)}
    else:
        module, sample = _MlpSeg(segment), {"b": torch.zeros(1, 1, seq_len, hidden)}
    return _convert_segment(module, sample)


@dataclass
class SegmentTemplate:
    """A probe graph and, per rewritable buffer, where it lies and which elements fill it."""

    kind: str
    key: tuple
    graph: bytes
    maps: list[tuple[int, np.ndarray]]  # (byte offset, indices into the flat tensors)

    def fill(self, segment: nn.Module) -> bytes:
        """The graph with ``segment``'s values (it must have this template's key)."""
        if template_key(segment) != self.key:
            raise ValueError("segment does not match the template's structure")
        flat = _flat(segment)
        out = bytearray(self.graph)
        for offset, index in self.maps:
            values = flat[index]
            out[offset:offset + 4 * values.size] = values.tobytes()
        return bytes(out)


def build_template(kind: str, segment: nn.Module, seq_len: int, hidden: int
                   ) -> Optional[SegmentTemplate]:
    """Convert the probe of ``segment`` once; None when the segment cannot be probed or
    the graph holds a constant that is part index, part not (folded arithmetic)."""
    probe = _probe(segment)
    if probe is None:
        return None
    graph = float_segment(kind, probe, seq_len, hidden)
    total = sum(t.numel() for _, t in segment_tensors(segment))
    maps = []
    for offset, count in _float_buffer_regions(graph):
        values = np.frombuffer(graph, np.float32, count, offset).astype(np.float64) - PROBE_BASE
        hits = (values >= 0) & (values < total) & (values == np.round(values))
        if hits.all():
            maps.append((offset, values.astype(np.int64)))
        elif hits.any():
            log.info("segment template: a %s constant mixes tensor values and computed "
                     "ones; converting every layer", kind)
            return None
    if not maps:
        return None
    return SegmentTemplate(kind, template_key(segment), graph, maps)


def graph_matches(graph: bytes, kind: str, segment: nn.Module,
                  feed: dict[str, np.ndarray]) -> bool:
    """Whether the float graph computes what the torch segment computes on ``feed``."""
    from ai_edge_litert.interpreter import Interpreter

    got = Interpreter(model_content=graph).get_signature_runner("segment")(**feed)["out"]
    with torch.no_grad():
        args = [torch.from_numpy(feed["a" if kind == "attn" else "b"])]
        if kind == "attn":
            args.append(torch.from_numpy(feed["mask"]))
        want = segment(*args).numpy()
    scale = float(np.abs(want).max()) or 1.0
    return got.shape == want.shape and float(np.abs(got - want).max()) <= TEMPLATE_TOLERANCE * scale


def fill_checked(template: Optional[SegmentTemplate], kind: str, segment: nn.Module,
                 seq_len: int, hidden: int, feed: dict[str, Any]) -> bytes:
    """The float graph of ``segment``: from the template when it has one that checks out
    on ``feed``, else converted by litert-torch."""
    if template is not None and template.key == template_key(segment):
        graph = template.fill(segment)
        if graph_matches(graph, kind, segment, feed):
            return graph
        log.warning("segment template: the filled %s graph differs from the torch segment; "
                    "converting it instead", kind)
    return float_segment(kind, segment, seq_len, hidden)
