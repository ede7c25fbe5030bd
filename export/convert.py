"""PyTorch encoder -> TFLite with litert-torch, one signature per bucket.

``convert_buckets`` follows litert-torch's own shape: it returns the converted
model object, whose ``.export(path)`` writes the flatbuffer. All buckets go into
one file (signature ``encode_<T>``) so the weights are stored once; litert-torch
deduplicates the shared parameters across signatures.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from gemma_edge.errors import ConversionError

from .encoder import BucketEncoder, EncoderCore

log = logging.getLogger("gemma_edge.export")
FLATBUFFER_LIMIT = 2**31 - 1  # TFLite flatbuffers cannot exceed 2 GiB


def signature_name(seq_len: int) -> str:
    return f"encode_{seq_len}"


def sample_kwargs(seq_len: int, hidden: int, slots: int) -> dict[str, torch.Tensor]:
    """Named sample inputs: the names become the TFLite signature's input names."""
    return {
        "embeddings": torch.zeros(1, seq_len, hidden),
        "mask": torch.ones(1, seq_len, seq_len),
        "pool": torch.ones(1, slots, seq_len),
    }


class _Named(torch.nn.Module):
    """Returns a dict so the signature output is called ``embedding``, not ``output_0``."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor,
                pool: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self.inner(embeddings, mask, pool)}


def convert_buckets(modules: dict[int, torch.nn.Module], hidden: int, slots: int,
                    quiet: bool = True, **convert_kwargs: Any) -> Any:
    """Convert ``{seq_len: module}`` into one multi-signature litert-torch model."""
    import litert_torch

    converter = None
    for seq_len, module in sorted(modules.items()):
        module = _Named(module).eval()
        kwargs = sample_kwargs(seq_len, hidden, slots)
        add = litert_torch.signature if converter is None else converter.signature
        converter = add(signature_name(seq_len), module, sample_kwargs=kwargs)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            return converter.convert(**convert_kwargs)
    except Exception as exc:  # noqa: BLE001 - litert-torch raises many types
        raise ConversionError(f"litert-torch could not convert the encoder: "
                              f"{type(exc).__name__}: {exc}") from exc


def export_model(model: Any, path: Path) -> int:
    """Write a converted model atomically; returns its size in bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        model.export(str(tmp))
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def convert_float(core: EncoderCore, buckets: Sequence[int], slots: int, out_dir: Path,
                  mask_penalty: float, progress: Optional[Callable[[str], None]] = None
                  ) -> list[dict[str, Any]]:
    """Float32 graphs for all buckets: one multi-signature file, or one file per bucket.

    Returns manifest graph entries (role "float").
    """
    hidden = core.spec.hidden_size
    modules = {t: BucketEncoder(core, t, mask_penalty).eval() for t in buckets}
    name = "encoder_float.tflite"
    if progress:
        progress(f"converting {len(buckets)} buckets {list(buckets)} to one float TFLite file")
    try:
        model = convert_buckets(modules, hidden, slots)
        size = export_model(model, out_dir / name)
        if size < FLATBUFFER_LIMIT:
            return [graph_entry(name, "float", buckets, slots, mask_penalty)]
        (out_dir / name).unlink()
        log.warning("multi-signature file would be %d bytes (> 2 GiB); writing one file per bucket",
                    size)
    except ConversionError as exc:
        log.warning("multi-signature conversion failed (%s); writing one file per bucket", exc)
    entries = []
    for t in buckets:
        if progress:
            progress(f"converting bucket {t}")
        single = f"encoder_float_{t}.tflite"
        export_model(convert_buckets({t: modules[t]}, hidden, slots), out_dir / single)
        entries.append(graph_entry(single, "float", [t], slots, mask_penalty))
    return entries


def graph_entry(path: str, role: str, buckets: Sequence[int], slots: int,
                mask_penalty: float, **extra: Any) -> dict[str, Any]:
    entry = {
        "path": path,
        "role": role,
        "seq_lens": [int(t) for t in buckets],
        "signatures": {str(t): signature_name(t) for t in buckets},
        "pool_slots": int(slots),
        "mask_penalty": float(mask_penalty),
    }
    entry.update(extra)
    return entry


def describe_io(path: Path) -> dict[str, Any]:
    """Per-signature input/output names, shapes, dtypes and quantisation parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    out: dict[str, Any] = {}

    def row(name: str, d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        return {"name": name, "shape": [int(s) for s in d["shape"]],
                "dtype": np.dtype(d["dtype"]).name,
                "quantization": {"scale": float(scale), "zero_point": int(zero)}}

    for key in interp.get_signature_list():
        runner = interp.get_signature_runner(key)
        out[key] = {
            "inputs": [row(n, d) for n, d in runner.get_input_details().items()],
            "outputs": [row(n, d) for n, d in runner.get_output_details().items()],
        }
    return out

