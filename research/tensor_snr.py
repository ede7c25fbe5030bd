"""Research: where inside one int8 segment the error appears, SNR of every tensor.

Run through ``python -m research segment-study --tensor-snr LAYERS``. The end-to-end
studies (``segment-study``) say how much a recipe loses; fake-quantisation
simulations in PyTorch said *where*, and twice they were wrong about the real graphs
(docs/quantization.md: the two-range products). This reads the real graphs instead: the
float TFLite conversion of a segment and its int8 quantisation run side by side on the
same inputs with every intermediate tensor kept, and each int8 tensor (dequantised) is
compared with the float tensor of the same name (ai-edge-quantizer keeps the names). The
SNR along the op chain shows which op's rounding costs what. Hand-written because
neither ai-edge-quantizer nor LiteRT compares two graphs tensor by tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class TensorSnr:
    op_index: int
    op: str
    tensor: str
    shape: tuple[int, ...]
    snr_db: float  # float signal power / int8 error power, over every feed

    def to_json(self) -> dict[str, Any]:
        return {"op_index": self.op_index, "op": self.op, "tensor": self.tensor,
                "shape": list(self.shape), "snr_db": round(self.snr_db, 2)}


def _interpreter(model: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # without the default XNNPACK delegate: it would fold op chains into one DELEGATE
    # node whose intermediate tensors cannot be read
    interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=(
                             OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
                         num_threads=1)
    interp.allocate_tensors()
    return interp


def _feed(interp: Any, feed: dict[str, np.ndarray]) -> None:
    from gemma_edge.device.runtime import quantize_input

    details = interp.get_input_details()
    for d in details:
        # by rank, as the device's segment runner does (a/b [1, 1, T, C], mask [1, T, T])
        value = next(v for v in feed.values() if v.ndim == len(d["shape"]))
        interp.set_tensor(d["index"], quantize_input(np.asarray(value, np.float32), d))
    interp.invoke()


def tensor_snr(float_model: bytes, int8_model: bytes,
               feeds: Sequence[dict[str, np.ndarray]]) -> list[TensorSnr]:
    """SNR (dB) of every op output of ``int8_model`` against ``float_model``, in op order.

    Tensors without a float counterpart of the same name and shape are skipped.
    """
    from gemma_edge.device.runtime import dequantize_output

    ref, q8 = _interpreter(float_model), _interpreter(int8_model)
    float_index = {d["name"]: d for d in ref.get_tensor_details()}
    q8_details = {d["index"]: d for d in q8.get_tensor_details()}
    ops = q8._get_ops_details()
    signal: dict[int, float] = {}
    noise: dict[int, float] = {}
    for feed in feeds:
        _feed(ref, feed)
        _feed(q8, feed)
        for op in ops:
            for t in op["outputs"]:
                d = q8_details[t]
                f = float_index.get(d["name"])
                if f is None or tuple(f["shape"]) != tuple(d["shape"]):
                    continue
                want = ref.get_tensor(f["index"]).astype(np.float64)
                got = dequantize_output(q8.get_tensor(t), d).astype(np.float64)
                signal[t] = signal.get(t, 0.0) + float((want ** 2).sum())
                noise[t] = noise.get(t, 0.0) + float(((got - want) ** 2).sum())
    rows = []
    for op in ops:
        for t in op["outputs"]:
            if t not in signal:
                continue
            snr = 10.0 * math.log10(max(signal[t], 1e-30) / max(noise[t], 1e-30))
            rows.append(TensorSnr(op["index"], op["op_name"], _short(q8_details[t]["name"]),
                                  tuple(int(s) for s in q8_details[t]["shape"]), snr))
    return rows


def _short(name: str) -> str:
    """The readable end of a converter tensor name (module path; op-number suffix)."""
    last = name.split(";")[-1] or name
    return last.rsplit("/", 1)[-1][-60:]


def format_table(title: str, rows: Sequence[TensorSnr]) -> str:
    lines = [title, f"{'op':>4}  {'kind':<14} {'SNR dB':>7}  {'shape':<18} tensor"]
    for r in rows:
        shape = "x".join(str(s) for s in r.shape)
        lines.append(f"{r.op_index:>4}  {r.op:<14} {r.snr_db:>7.1f}  {shape:<18} {r.tensor}")
    return "\n".join(lines)
