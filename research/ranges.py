"""Research: activation range statistics other than ai-edge-quantizer's own.

The export calibrates every fully int8 graph with ai-edge-quantizer's min/max
(a moving average over the samples, ``quantize.moving_average_ranges``). The studies
(``python -m research segment-study --ranges R``) compared it with:

- ``max``: min/max over every sample; ``median``: the median of the per-sample min
  and max (ai-edge-quantizer folds samples by a moving average only, so it is asked
  once per sample);
- ``mse``: the moving average's range shrunk, per tensor, to the least int8
  rounding + clipping error (below). ai-edge-quantizer's MSE and OCTAV algorithms
  choose *weight* scales; for activations they fall back to min/max, so one outlier
  token sets a tensor's whole int8 step. This runs the float graph on the calibration
  samples with every intermediate tensor kept, and for each calibrated tensor picks
  the shrink factor of its min/max range that minimises the mean squared error over
  the samples' values. Written here because no installed library does activation MSE
  calibration for TFLite graphs.

None beat the moving average on the segments (docs/quantization.md).
"""

from __future__ import annotations

import enum
import os
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.export.quantize import RangeFn, min_max_calibration, moving_average_ranges


class RangeStatistic(str, enum.Enum):
    """How per-sample activation ranges become one range per tensor."""

    MOVING_AVERAGE = "moving-average"  # ai-edge-quantizer's own (EMA 0.95): the export's
    MAX = "max"                        # min/max over every sample
    MEDIAN = "median"                  # median of the per-sample min and max
    MSE = "mse"                        # moving average, then shrunk to the least int8 MSE


def range_function(statistic: RangeStatistic) -> Optional[RangeFn]:
    """The ``ranges`` argument of ``quantize.quantize_graph`` for ``statistic`` (None:
    the export's own, the moving average)."""
    if statistic is RangeStatistic.MOVING_AVERAGE:
        return None
    if statistic is RangeStatistic.MSE:
        def mse(qt: Any, float_model: bytes, signature: str,
                samples: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
            return mse_ranges(float_model, signature, samples,
                              moving_average_ranges(qt, float_model, signature, samples))
        return mse

    def per_sample(qt: Any, float_model: bytes, signature: str,
                   samples: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
        return per_sample_ranges(qt, float_model, signature, samples, statistic)
    return per_sample


def per_sample_ranges(qt: Any, float_model: bytes, signature: str,
                      samples: Sequence[dict[str, np.ndarray]],
                      statistic: RangeStatistic) -> dict[str, Any]:
    """Each sample's own min/max, folded by ``statistic`` (MAX or MEDIAN)."""
    threads = os.cpu_count() or 1
    per_sample = [min_max_calibration(qt, signature, [sample], threads, float_model)
                  for sample in samples]
    low, high = ((np.min, np.max) if statistic is RangeStatistic.MAX
                 else (np.median, np.median))
    out = {}
    for name, qsv in per_sample[0].items():
        stats = [r[name] for r in per_sample if name in r]
        out[name] = dict(qsv, min=low(np.stack([q["min"] for q in stats]), axis=0),
                         max=high(np.stack([q["max"] for q in stats]), axis=0))
    return out


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
