"""Torch building blocks that convert to Edge TPU-mappable TFLite ops.

The full-int8 segments (``segments``) and the research single-graph encoder
(research/coral_graph.py) are written with these only, so litert-torch emits
nothing the Edge TPU compiler (edgetpu_compiler 16) leaves on the CPU
(docs/edgetpu.md lists what maps):

- activations are ``[1, 1, T, C]`` (NHWC with H = 1, W = tokens) and every token
  projection is a 1x1 ``CONV_2D`` (``conv1x1`` + ``apply_conv``): litert-torch emits
  NCHW->NHWC transposes around ``nn.Conv2d``, and written as ``permute -> conv ->
  permute`` they cancel, so the graph has no ``TRANSPOSE``, no ``BATCH_MATMUL``;
- GELU-tanh as MUL/ADD/LOGISTIC (``gelu_sigmoid``), exp as LOGISTIC/RSQRT
  (``exp_neg``): no GELU, TANH or EXP builtin;
- attention products as MUL + SUM over blocks of query rows (``row_blocks``): the
  compiler keeps an op's activations on chip, so no op may materialise more than
  ``DEFAULT_MAX_PRODUCT`` elements.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

GELU_C1 = 2.0 * math.sqrt(2.0 / math.pi)  # sigmoid(2z) == 0.5 (1 + tanh(z))
GELU_C2 = GELU_C1 * 0.044715
# Largest attention product (elements = int8 bytes) one MUL may materialise: the Edge TPU
# keeps an op's activations in its ~8 MB of SRAM next to the cached parameters.
DEFAULT_MAX_PRODUCT = 1 << 20


def conv1x1(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Conv2d:
    """A 1x1 convolution with the weights of a Linear ``[out, in]``."""
    out_ch, in_ch = weight.shape
    conv = nn.Conv2d(in_ch, out_ch, 1, bias=bias is not None)
    conv.weight = nn.Parameter(weight.detach().float().reshape(out_ch, in_ch, 1, 1).contiguous(),
                               requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
    return conv


def apply_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """1x1 conv of ``x [1, 1, T, C]`` (NHWC); the two permutes cancel the converter's."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU-tanh as ``x * sigmoid(x * (c1 + c2 * x^2))``: the identity 0.5 (1 + tanh(z))
    = sigmoid(2 z) turns the tanh form into MUL/ADD/LOGISTIC, one op shorter than with
    TANH, and nothing the converter can fuse back into a ``GELU`` builtin."""
    return x * torch.sigmoid(x * (GELU_C1 + GELU_C2 * x * x))


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, no gain: MUL, MEAN, ADD, RSQRT (no POW / SQUARE)."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation without its sign (the sign rides on the sine table)."""
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


def exp_neg(y: torch.Tensor) -> torch.Tensor:
    """exp(-y) for y >= 0 in Edge TPU ops (EXP does not map): sigmoid(-y) / sigmoid(y),
    the division a square of RSQRT (sigmoid(y) is in [0.5, 1])."""
    r = torch.rsqrt(torch.sigmoid(y))
    return torch.sigmoid(-y) * r * r


def row_blocks(rows: torch.Tensor, other: torch.Tensor, axis: int, max_product: int
               ) -> torch.Tensor:
    """``(rows * other).sum(axis)`` over row blocks of at most ``max_product`` products.

    rows [1, R, a, b] broadcast against other [1, 1, c, d]: the product [1, R, T, D]
    is the only place an attention graph materialises T * T * D numbers; the Edge TPU
    must hold an op's activations on chip (compiler 16 fails with "large activation
    tensors in model" otherwise), so it is cut into blocks of query rows, each its own
    MUL + SUM, concatenated back. The blocks' int8 ranges are unified afterwards
    (``quantize.row_block_groups``).
    """
    total, per_row = rows.shape[1], other.shape[2] * other.shape[3]
    block = max(1, min(total, max_product // per_row))
    if block >= total:
        return (rows * other).sum(axis)
    return torch.cat([(rows[:, a:a + block] * other).sum(axis)
                      for a in range(0, total, block)], dim=1)
