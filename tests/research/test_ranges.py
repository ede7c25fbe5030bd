"""research/ranges.py: the activation range statistics the export's was compared with."""

from __future__ import annotations

import numpy as np
import pytest

BUCKET = 32


@pytest.mark.slow
def test_range_statistics_of_the_calibration(tiny_core, calibration):
    """Ranges from the samples' own ranges: max >= median, each graph still fully int8."""
    pytest.importorskip("ai_edge_quantizer")
    pytest.importorskip("litert_torch")
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.export import segments as seg
    from gemma_edge.export.quantize import check_fully_int8
    from gemma_edge.export.segments import quantize_segment
    from research.ranges import RangeStatistic, range_function

    samples = calibration[BUCKET][:4]
    scales = seg.measure_scales(tiny_core, samples)
    segments = seg.layer_segments(tiny_core, BUCKET, scales)
    feeds = seg.segment_inputs(tiny_core, scales, samples)[(0, "mlp")]
    assert len(feeds) == 4
    assert range_function(RangeStatistic.MOVING_AVERAGE) is None  # the export's own
    out_scale = {}
    for ranges in (RangeStatistic.MAX, RangeStatistic.MEDIAN, RangeStatistic.MOVING_AVERAGE,
                   RangeStatistic.MSE):
        data = quantize_segment("mlp", segments[0][1], BUCKET, tiny_core.spec.hidden_size, feeds,
                                range_function(ranges))
        check_fully_int8(data)
        interp = Interpreter(model_content=data)
        # the gate projection's output: its range differs from sample to sample (the
        # segment's outputs are normalised per channel over these same samples)
        gate = next(op for op in interp._get_ops_details() if op["op_name"] == "CONV_2D")
        out_scale[ranges] = interp._get_tensor_details(gate["outputs"][0], 0)["quantization"][0]
    assert out_scale[RangeStatistic.MAX] > out_scale[RangeStatistic.MEDIAN] > 0
    assert out_scale[RangeStatistic.MAX] >= out_scale[RangeStatistic.MOVING_AVERAGE] > 0
    # MSE only ever shrinks the moving-average range
    assert 0 < out_scale[RangeStatistic.MSE] <= out_scale[RangeStatistic.MOVING_AVERAGE] * 1.0001


def test_mse_range_clips_a_lone_outlier_and_keeps_a_dense_range():
    from research.ranges import best_ratio

    rng = np.random.default_rng(0)
    dense = rng.uniform(-1.0, 1.0, 20000).astype(np.float32)
    weights = np.ones_like(dense)
    assert best_ratio(dense, weights, float(dense.min()), float(dense.max())) == 1.0
    # one outlier among two million small values (a subsample, each standing for 100)
    spiky = np.concatenate([rng.normal(0.0, 0.05, 20000), [5.0]]).astype(np.float32)
    weights = np.full_like(spiky, 100.0)
    weights[-1] = 1.0
    ratio = best_ratio(spiky, weights, -5.0, 5.0)
    assert ratio < 0.5
    # the weights count: the outlier standing for many values keeps the range wider
    weights[-1] = 1e5
    assert best_ratio(spiky, weights, -5.0, 5.0) > ratio
