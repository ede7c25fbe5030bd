"""MSE-optimal activation ranges for the fully int8 graphs.

ai-edge-quantizer calibrates activations by min/max only (its MSE and OCTAV
algorithms choose *weight* scales; for activations they fall back to min/max), so
one outlier token sets a tensor's whole int8 step. This module runs the float graph
on the calibration samples with every intermediate tensor kept, and for each
calibrated tensor picks the shrink factor of its min/max range that minimises the
mean squared int8 rounding + clipping error over the samples' values. Written here
because no installed library does activation MSE calibration for TFLite graphs.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

# Shrink factors tried for each tensor's calibrated range (1.0 = min/max as is).
RATIOS = np.linspace(0.25, 1.0, 31)
# Values kept per tensor and sample: a uniform subsample plus the largest magnitudes,
# each weighted by how many values of the sample it stands for.
SUBSAMPLE = 8192
EXTREMES = 256


def _sample_values(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights): the sample's largest magnitudes exactly, the rest subsampled."""
    flat = values.astype(np.float32, copy=False).ravel()
    if flat.size <= SUBSAMPLE + EXTREMES:
        return flat.copy(), np.ones(flat.size, np.float32)
    top = np.argpartition(np.abs(flat), flat.size - EXTREMES)[-EXTREMES:]
    rest = np.ones(flat.size, bool)
    rest[top] = False
    others = np.flatnonzero(rest)
    picked = others[rng.integers(0, others.size, SUBSAMPLE)]
    weight = np.float32(others.size / SUBSAMPLE)
    return (np.concatenate([flat[top], flat[picked]]),
            np.concatenate([np.ones(EXTREMES, np.float32), np.full(SUBSAMPLE, weight)]))


def best_ratio(values: np.ndarray, weights: np.ndarray, low: float, high: float) -> float:
    """Shrink factor of [low, high] with the least weighted int8 quantisation MSE."""
    if not high > low:
        return 1.0
    best, best_err = 1.0, np.inf
    for r in RATIOS:
        lo, hi = min(r * low, 0.0), max(r * high, 0.0)
        step = (hi - lo) / 255.0
        if step <= 0:
            continue
        q = np.clip(np.round((values - lo) / step), 0, 255) * step + lo
        err = float(np.dot(weights, (values - q) ** 2))
        if err < best_err:
            best, best_err = float(r), err
    return best


def mse_ranges(float_model: bytes, signature: str, samples: Sequence[dict[str, np.ndarray]],
               calibration: dict[str, Any]) -> dict[str, Any]:
    """``calibration`` (ai-edge-quantizer's {tensor: {min, max}}) with MSE-shrunk ranges.

    Weights and tensors without a per-tensor range are left alone.
    """
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=float_model, num_threads=os.cpu_count() or 1,
                         experimental_preserve_all_tensors=True)
    runner = interp.get_signature_runner(signature)
    index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
    names = [n for n, q in calibration.items()
             if n in index and np.size(q.get("min", [])) == 1 and np.size(q.get("max", [])) == 1]
    pools: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for sample in samples:
        runner(**sample)
        for n in names:
            pools[n].append(_sample_values(interp.get_tensor(index[n]), rng))
    out = dict(calibration)
    for n in names:
        values = np.concatenate([v for v, _ in pools[n]])
        weights = np.concatenate([w for _, w in pools[n]])
        low = float(np.asarray(calibration[n]["min"]).ravel()[0])
        high = float(np.asarray(calibration[n]["max"]).ravel()[0])
        r = best_ratio(values, weights, low, high)
        if r < 1.0:
            shape = np.shape(calibration[n]["min"])
            out[n] = dict(calibration[n], min=np.full(shape, r * low, np.float32),
                          max=np.full(shape, r * high, np.float32))
    return out
