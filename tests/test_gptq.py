"""GPTQ on ai-edge-quantizer's int4 grid (export/gptq.py): the grid round-trips through the
quantiser's own functions bit for bit, and GPTQ beats round-to-nearest on a layer's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_edge.export import gptq


def _layer(seed: int = 0, out_f: int = 48, in_f: int = 96, tokens: int = 512):
    """A weight matrix and correlated inputs with a few outlier channels (as in an LLM)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g) * 0.05
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    x = torch.randn(tokens, in_f, generator=g) @ mix
    x[:, :4] *= 8.0
    return weight, x


def test_converter_scale_is_the_quantisers():
    weight, _ = _layer()
    codes, scales = gptq.converter_codes(weight.numpy())
    assert np.array_equal(scales, gptq.converter_scale(np.abs(weight.numpy()).max(axis=1)))
    assert codes.min() >= -7 and codes.max() <= 7  # -8 is never produced from data
    ours = gptq.rtn(weight)
    assert np.array_equal(ours.codes.numpy(), codes)


@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_grid_weights_round_trip_bit_for_bit(clip):
    weight, x = _layer(1)
    result = gptq.gptq(weight, gptq.hessian(x), gptq.row_scales(weight, clip))
    codes, scales = gptq.converter_codes(result.weight().numpy())
    assert np.array_equal(codes, result.codes.numpy())
    assert scales.tobytes() == result.scales.numpy().tobytes()


def test_fixed_point_scale():
    rng = np.random.default_rng(0)
    s = gptq.fixed_point_scale(rng.uniform(1e-4, 1.0, 10_000).astype(np.float32))
    assert np.array_equal(gptq.converter_scale(s * np.float32(7)), s)


def test_every_row_keeps_a_code_of_seven():
    weight, x = _layer(2)
    result = gptq.gptq(weight, gptq.hessian(x))
    assert bool((result.codes.abs().amax(dim=1) == 7).all())
    with pytest.raises(ValueError):
        gptq.grid_weights(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_round_to_nearest(act_order):
    weight, x = _layer(3)
    h = gptq.hessian(x)
    held = _layer(3, tokens=256)[1] @ torch.eye(x.shape[1])  # same distribution, new draw
    g = gptq.gptq(weight, h, act_order=act_order)
    r = gptq.rtn(weight, g.scales)  # the same grid
    assert gptq.output_error(weight, g.weight(), h) < 0.7 * gptq.output_error(weight, r.weight(), h)
    ref = held @ weight.T
    err_g = float(((held @ g.weight().T - ref) ** 2).sum())
    err_r = float(((held @ r.weight().T - ref) ** 2).sum())
    assert err_g < err_r


@pytest.mark.slow
def test_converted_graph_keeps_the_codes_bit_for_bit():
    """A converted graph (litert-torch) quantised with the mixed recipe: the marked linear
    gets INT4 weights whose codes and scales are GPTQ's, byte for byte; the other int8."""
    import litert_torch

    from gemma_edge.export.quantize import tensor_dtype_census

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 128, bias=False)
            self.b = torch.nn.Linear(128, 64, bias=False)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True))  # not fused into b

    torch.manual_seed(0)
    model = Two().eval()
    result = gptq.gptq(model.b.weight.detach(), gptq.hessian(torch.randn(500, 128)))
    model.b.weight.data = result.weight()
    gptq.mark_int4(model.b)
    float_graph = litert_torch.convert(model, (torch.zeros(4, 64),)).model_content()

    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(bytearray(float_graph))
    qt.load_quantization_recipe(gptq.mixed_recipe())
    graph = bytes(qt.quantize(None, enable_progress_report=False).quantized_model)
    census = tensor_dtype_census(graph)
    assert census.get("INT4") == 1 and census.get("INT8") == 1
    [(_, codes, scales)] = gptq.int4_tensors(graph)
    assert np.array_equal(codes, result.codes.numpy())
    assert scales.tobytes() == result.scales.numpy().tobytes()
