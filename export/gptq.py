"""GPTQ rounding of a linear layer's weights onto ai-edge-quantizer's per-channel int4 grid.

The grid (ai-edge-quantizer 0.10, ``dynamic_wi4c_afp32``, algorithm
``min_max_uniform_quantize``; ``uniform_quantize_tensor.tensor_zp_scale_from_min_max``
and ``uniform_quantize``): per output channel (axis 0 of a FULLY_CONNECTED weight
``[out, in]``), symmetric, signed, zero point 0,

    scale = max(|min(row)|, |max(row)|, 1e-9) / 7        (float32)
    code  = clip(rint(w / scale), -8, 7)                 (round half to even)

``narrow_range`` is off below 8 bits, but a row's values never exceed its own absmax,
so the codes it produces are -7..7: 15 levels, one scale per row. A weight matrix
whose every row is ``code * s`` with at least one ``|code| == 7`` comes back from the
quantiser as exactly those codes and (for a scale ``s`` that is a fixed point of
``fl(fl(7 s) / 7)``, ``converter_scale``) exactly that scale: so the export can keep
any rounding chosen here (``grid_weights``), bit for bit.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): with ``H = 2 X^T X`` over calibration inputs ``X`` of the
layer, columns are rounded one at a time and the rounding error of each is spread over
the columns not yet rounded (``W[:, j+1:] -= err_j * Hinv_U[j, j+1:] / Hinv_U[j, j]``,
``Hinv_U`` the upper Cholesky factor of ``H^-1``), which minimises ``||X W^T - X Q^T||``
far better than rounding to nearest. Scales stay those of the float row (or of a
clipped row, ``clip``), so the grid is fixed before the rounding starts.

torch only; no TFLite here (research/int4_gptq.py checks the converted graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

QMAX = 7       # the quantiser's scale divisor for 4 bits (2**3 - 1)
MIN_BOUND = 1e-9  # ai-edge-quantizer's smallest bound (zero rows)


def converter_scale(absmax: np.ndarray) -> np.ndarray:
    """The quantiser's scale for rows of these absolute maxima (float32)."""
    bound = np.maximum(np.asarray(absmax, np.float32), np.float32(MIN_BOUND))
    return (bound / np.float32(QMAX)).astype(np.float32)


def fixed_point_scale(scale: np.ndarray, steps: int = 8) -> np.ndarray:
    """The nearest scales ``s`` with ``converter_scale(fl(7 s)) == s`` (float32).

    Then a row whose largest value is ``fl(7 s)`` (a code of +-7) gets back exactly
    ``s``. Most float32 scales are fixed points already; the rest settle in a step."""
    s = np.asarray(scale, np.float32).copy()
    for _ in range(steps):
        again = converter_scale(s * np.float32(QMAX))
        if np.array_equal(again, s):
            return s
        s = again
    raise ValueError("no fixed-point scale found")  # pragma: no cover - float32 settles


def row_scales(weight: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Per-output-channel scales on the converter's grid: ``clip * absmax / 7``, moved to
    a fixed point (``fixed_point_scale``). ``clip`` < 1 clips each row's largest values
    to +-7 steps (a finer step for the rest)."""
    absmax = weight.detach().abs().amax(dim=1).float().cpu().numpy()
    return torch.from_numpy(fixed_point_scale(converter_scale(absmax * np.float32(clip))))


def rtn_codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, as numpy's rint) on the grid: int8 codes -7..7."""
    return torch.clamp(torch.round(weight.float() / scales[:, None]), -QMAX, QMAX).to(torch.int8)


def grid_weights(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight matrix the converter quantises back to exactly ``codes`` and
    ``scales``: ``code * s``; every row must hold a code of +-7 (``anchor_rows``)."""
    codes = codes.to(torch.int32)
    if not bool((codes.abs().amax(dim=1) == QMAX).all()):
        raise ValueError("every row needs a code of +-7, or the converter picks another scale")
    return (codes.float() * scales.float()[:, None]).contiguous()


def converter_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) that ai-edge-quantizer's min/max int4 per-channel quantiser gives
    ``weight [out, in]``, computed with its own functions."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uq

    weight = np.asarray(weight, np.float32)
    zp, scale = uq.tensor_zp_scale_from_min_max(
        weight.min(axis=1, keepdims=True), weight.max(axis=1, keepdims=True), 4, True,
        qtyping.QuantGranularity.CHANNELWISE)
    params = qtyping.UniformQuantParams(scale=scale, zero_point=zp, num_bits=4, symmetric=True,
                                        quantized_dimension=0)
    return uq.uniform_quantize(weight, params), np.asarray(scale, np.float32).reshape(-1)


@dataclass
class GPTQResult:
    codes: torch.Tensor     # [out, in] int8, -7..7, every row holding +-7
    scales: torch.Tensor    # [out] float32, fixed points of the converter's scale
    forced: int             # anchor entries whose nearest code was not +-7

    def weight(self) -> torch.Tensor:
        return grid_weights(self.codes, self.scales)


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """``2 X^T X`` (float64) of a layer's inputs ``[tokens, in]``: add these over batches."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2.0 * x.T @ x


def gptq(weight: torch.Tensor, h: torch.Tensor, scales: Optional[torch.Tensor] = None,
         damp: float = 0.01, act_order: bool = True, block: int = 128,
         anchor: bool = True) -> GPTQResult:
    """GPTQ on the converter's int4 grid.

    ``weight [out, in]``; ``h [in, in]`` the summed ``2 X^T X`` (``hessian``); ``scales``
    default ``row_scales(weight)``. ``damp`` * mean(diag H) is added to the diagonal;
    ``act_order`` rounds the columns of the largest ``diag H`` first. ``anchor``: each
    row's largest float entry is given the code +-7 (its sign) whatever the error
    feedback has made of it, so every row keeps the scale the converter will compute.
    """
    w = weight.detach().double().clone()
    out_f, in_f = w.shape
    s = (row_scales(weight) if scales is None else scales).double()
    h = h.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    anchor_col = weight.detach().abs().argmax(dim=1)
    anchor_sign = torch.sign(weight.detach()[torch.arange(out_f), anchor_col]).double()
    anchor_sign[anchor_sign == 0] = 1.0

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    inv_perm = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]
    pos_of_anchor = inv_perm[anchor_col]  # the anchor's column after the permutation

    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype)
    chol = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(chol)
    u = torch.linalg.cholesky(hinv, upper=True)

    codes = torch.zeros(out_f, in_f, dtype=torch.float64)
    forced = 0
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = wb[:, i]
            q = torch.clamp(torch.round(col / s), -QMAX, QMAX)
            if anchor:
                rows = torch.nonzero(pos_of_anchor == b0 + i).flatten()
                if len(rows):
                    want = anchor_sign[rows] * QMAX
                    forced += int((q[rows] != want).sum())
                    q[rows] = want
            codes[:, b0 + i] = q
            err = (col - q * s) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    codes = codes[:, inv_perm]
    return GPTQResult(codes.round().to(torch.int8), s.float(), forced)


def rtn(weight: torch.Tensor, scales: Optional[torch.Tensor] = None) -> GPTQResult:
    """Round to nearest: by default the converter's own result (its scales
    ``absmax / 7``, not moved to a fixed point): the baseline GPTQ has to beat."""
    if scales is None:
        absmax = weight.detach().abs().amax(dim=1).float().cpu().numpy()
        scales = torch.from_numpy(converter_scale(absmax))
    s = scales
    codes = rtn_codes(weight, s)
    return GPTQResult(codes, s.float(), 0)


def output_error(weight: torch.Tensor, quantised: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / 2`` = the summed squared error of the layer's outputs
    over the calibration inputs whose ``hessian`` is ``h``."""
    d = (weight.double() - quantised.double())
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d) / 2.0)


class Int4Linear(torch.nn.Linear):
    """An ``nn.Linear`` that converts as any other, but whose FULLY_CONNECTED's tensor
    names carry ``Int4Linear`` (litert-torch names ops by the module's class path): a
    recipe regex (``INT4_REGEX``) gives those ops int4 weights and the rest int8."""


INT4_REGEX = ".*Int4Linear.*"


def mark_int4(module: torch.nn.Linear) -> None:
    """Make ``module`` an ``Int4Linear`` in place (same weights, same forward)."""
    module.__class__ = Int4Linear


def mixed_recipe(int4_regex: str = INT4_REGEX, hadamard: bool = False) -> list:
    """ai-edge-quantizer recipe: dynamic int8 per-channel weights everywhere (the shipped
    CPU graph's ``dynamic_wi8_afp32``), dynamic int4 per-channel on the ops whose names
    match ``int4_regex`` (the later rule wins): its min/max grid (round to nearest, which
    GPTQ's codes are written on), or with ``hadamard`` its decomposed Hadamard rotation
    (``dynamic_wi4c_hr_afp32``: weights rotated offline with OCTAV clipping, the inputs'
    rotation inserted into the graph)."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    rp = recipe_manager.RecipeManager()
    rp.add_dynamic_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                          num_bits=8)
    rp.add_dynamic_config(
        regex=int4_regex, operation_name=qtyping.TFLOperationName.FULLY_CONNECTED, num_bits=4,
        algorithm_key=(AlgorithmName.DECOMPOSED_HADAMARD_ROTATION if hadamard
                       else AlgorithmName.MIN_MAX_UNIFORM_QUANT))
    return rp.get_quantization_recipe()


def int4_tensors(model: bytes) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, codes [out, in] int8, scales float32) of every INT4 tensor of a flatbuffer,
    unpacked from its buffer (two codes a byte, the first in the low nibble)."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    out = []
    for s in range(root.SubgraphsLength()):
        sub = root.Subgraphs(s)
        for t in range(sub.TensorsLength()):
            ten = sub.Tensors(t)
            if ten.Type() != schema.TensorType.INT4:
                continue
            buf = root.Buffers(ten.Buffer())
            data = buf.DataAsNumpy()
            if not isinstance(data, np.ndarray) or data.size == 0:  # stored after the flatbuffer
                data = np.frombuffer(model, np.uint8, buf.Size(), buf.Offset())
            data = data.astype(np.uint8)
            nibbles = np.stack([data & 0xF, data >> 4], 1).reshape(-1).astype(np.int8)
            nibbles[nibbles > 7] -= 16
            shape = tuple(int(d) for d in ten.ShapeAsNumpy())
            codes = nibbles[:int(np.prod(shape))].reshape(shape)
            scales = ten.Quantization().ScaleAsNumpy().astype(np.float32)
            out.append((ten.Name().decode(), codes, scales))
    return out
