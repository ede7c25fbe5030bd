"""What edgetpu_compiler 16 maps, as data: one entry per operator, each with its source.

Sources, quoted in the comments next to each rule:

- [REQ]  coral.ai/docs/edgetpu/models-intro/#model-requirements
- [OPS]  coral.ai/docs/edgetpu/models-intro/#supported-operations (table 1: name,
         minimum runtime version, known limitations)
- [CUT]  coral.ai/docs/edgetpu/models-intro/#compiling ("the Edge TPU compiler cannot
         partition the model more than once, so as soon as an unsupported operation
         occurs, that operation and everything after it executes on the CPU")
- [CMP]  coral.ai/docs/edgetpu/compiler/ (options, compiler/runtime versions)
- [LOG]  a status string the compiler prints in its operation table
- [RES]  TFLite's BuiltinOpResolver of mid-2021 (tensorflow/lite/kernels/register.cc,
         the generation compiler 16.0.384591198 embeds)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .tflite_reader import Graph, Operator, Tensor

COMPILER_VERSION = "16.0.384591198"
# [CMP] "Compiler and runtime versions": compiler 16.0 writes runtime-14 models by default.
DEFAULT_MIN_RUNTIME = 14

# [LOG] status strings, verbatim from the compiler's "Operator Count Status" table.
MAPPED = "Mapped to Edge TPU"
UNSPECIFIED = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
AFTER_CUT = "More than one subgraph is not supported"
BAD_DTYPE = "Operation is working on an unsupported data type"
BAD_RANK = "Tensor has unsupported rank (up to 3 innermost dimensions mapped)"
NOT_SUPPORTED = "Operation not supported"
BAD_VERSION = "Operation version not supported"
KNOWN_STATUSES = (MAPPED, UNSPECIFIED, AFTER_CUT, BAD_DTYPE, BAD_RANK, NOT_SUPPORTED,
                  BAD_VERSION, "Unsupported data type")

OPS_DOC = "coral.ai/docs/edgetpu/models-intro/#supported-operations"
REQ_DOC = "coral.ai/docs/edgetpu/models-intro/#model-requirements"
EIGHT_BIT = ("int8", "uint8")


@dataclass(frozen=True)
class Finding:
    """Why one operator stays on the CPU: the compiler's status, our reason, the source."""

    status: str
    reason: str
    source: str


Check = Callable[[Operator, Graph], Optional[Finding]]


@dataclass(frozen=True)
class OpSupport:
    min_runtime: int  # 0: every runtime version ("All" in [OPS])
    limits: str  # [OPS] "Known limitations" column, for the docs and the report
    check: Optional[Check] = None


def _limit(reason: str) -> Finding:
    return Finding(UNSPECIFIED, reason, f"{OPS_DOC} (known limitations)")


def _out(op: Operator, g: Graph) -> Optional[Tensor]:
    outs = g.op_outputs(op)
    return outs[0] if outs else None


def _inp(op: Operator, g: Graph, i: int) -> Optional[Tensor]:
    return g.tensor(op.inputs[i]) if i < len(op.inputs) else None


def _name(t: Tensor) -> str:
    """Converter tensor names run to hundreds of characters; the tail identifies them."""
    return repr(t.name if len(t.name) <= 48 else "..." + t.name[-45:])


def _non_unit(t: Tensor) -> int:
    return sum(1 for d in t.shape if d > 1)


def _axes(t: Optional[Tensor], rank: int) -> Optional[list[int]]:
    if t is None or t.values is None:
        return None
    return sorted({int(a) % rank for a in t.values}) if rank else []


def _no_fused_activation(op: Operator, _g: Graph) -> Optional[Finding]:
    # [OPS] AveragePool2d, Concatenation, MaxPool2d, Mean: "No fused activation function."
    if op.options.get("fusedActivationFunction", 0):
        return _limit("fused activation function (the table allows none for this op)")
    return None


def _fully_connected(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] FullyConnected: "Only the default format is supported for fully-connected
    # weights. Output tensor is one-dimensional."
    if op.options.get("weightsFormat", 0):
        return _limit("shuffled weights format; only the default format maps")
    out = _out(op, g)
    if out is not None and _non_unit(out) > 1:
        return _limit(f"output {list(out.shape)} is not one-dimensional (one token per call "
                      "maps; for a sequence use a 1x1 CONV_2D over [1, 1, T, K])")
    return None


def _softmax(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] Softmax: "Supports only 1-D input tensor with a max of 16,000 elements."
    x = _inp(op, g, 0)
    if x is None:
        return None
    if _non_unit(x) > 1:
        return _limit(f"input {list(x.shape)} is not 1-D (attention scores are [T, T])")
    if x.elements > 16000:
        return _limit(f"input has {x.elements} elements, more than 16,000")
    return None


def _same_dilation(op: Operator, _g: Graph) -> Optional[Finding]:
    # [OPS] Conv2d / DepthwiseConv2d (13+): "Must use the same dilation in x and y dimensions."
    if op.options.get("dilationWFactor", 1) != op.options.get("dilationHFactor", 1):
        return _limit("different dilation in x and y")
    return None


def _concatenation(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] Concatenation: "No fused activation function. If any input is a compile-time
    # constant tensor, there must be only 2 inputs, and this constant tensor must be all
    # zeroes (effectively, a zero-padding op)."
    found = _no_fused_activation(op, g)
    if found:
        return found
    consts = [t for t in g.op_inputs(op) if t.constant]
    if consts and (len(op.inputs) != 2 or any(t.all_zero is not True for t in consts)):
        return _limit("a constant input that is not the all-zero half of a 2-input concat")
    return None


def _reduce_axes(inner3: bool) -> Check:
    def check(op: Operator, g: Graph) -> Optional[Finding]:
        # [OPS] Mean (13+): "Supports reduction along x-, y-, and/or z-dimensions only."
        # Sum / ReduceMax / ReduceMin: "Cannot operate on the batch dimension."
        x = _inp(op, g, 0)
        if x is None:
            return None
        axes = _axes(_inp(op, g, 1), x.rank)
        if axes is None:
            return _limit("reduction axes are not a compile-time constant")
        allowed = set(range(max(x.rank - 3, 1), x.rank)) if inner3 else set(range(1, x.rank))
        if x.rank > 1 and not set(axes) <= allowed:
            return _limit(f"reduces axes {axes} of a rank-{x.rank} tensor (batch or "
                          "outer dimension)")
        return None
    return check


def _mean(op: Operator, g: Graph) -> Optional[Finding]:
    return _no_fused_activation(op, g) or _reduce_axes(True)(op, g)


def _pad(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] Pad (13+): "Supports padding along x-, y-, and/or z-dimensions only."
    x, pads = _inp(op, g, 0), _inp(op, g, 1)
    if x is None or pads is None or pads.values is None:
        return _limit("paddings are not a compile-time constant")
    outer = pads.values[: 2 * max(x.rank - 3, 0)]
    if any(int(v) for v in outer):
        return _limit("pads an outer (batch) dimension")
    return None


def _strided_slice(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] StridedSlice: "Supported only when all strides are equal to 1 (that is,
    # effectively a Stride op), and with ellipsis-axis-mask == 0, and new-axis-max == 0."
    strides = _inp(op, g, 3)
    if strides is None or strides.values is None or any(int(v) != 1 for v in strides.values):
        return _limit("strides are not all 1")
    if op.options.get("ellipsisMask", 0) or op.options.get("newAxisMask", 0):
        return _limit("ellipsis or new-axis mask is set")
    return None


def _split(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] Split: "No splitting in batch dimension."  SPLIT's inputs are (axis, value).
    axis, x = _inp(op, g, 0), _inp(op, g, 1)
    if axis is None or x is None or axis.values is None:
        return _limit("split axis is not a compile-time constant")
    if x.rank > 1 and int(axis.values[0]) % x.rank == 0:
        return _limit("splits the batch dimension")
    return None


def _pack(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] Pack (13+): "No packing in batch dimension."
    return _limit("packs along the batch dimension") if op.options.get("axis", 0) == 0 else None


def _prelu(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] PReLU (13+): "Alpha needs to be 1-dimensional (only the innermost dimension
    # can be >1 size)."
    alpha = _inp(op, g, 1)
    if alpha is not None and any(d > 1 for d in alpha.shape[:-1]):
        return _limit(f"alpha {list(alpha.shape)} is not 1-D")
    return None


def _quantize(op: Operator, g: Graph) -> Optional[Finding]:
    # [OPS] Quantize (13+) maps as an 8-bit requantisation.  A float -> int8 QUANTIZE at
    # the graph input shows up in compiler logs as "otherwise supported, but not mapped".
    x = _inp(op, g, 0)
    if x is not None and x.dtype not in EIGHT_BIT:
        return Finding(UNSPECIFIED, f"{x.dtype} -> 8-bit conversion runs on the CPU",
                       f"{OPS_DOC} (Quantize); compiler logs")
    return None


# [OPS] Table 1.  Anything not listed here is "Operation not supported" [LOG].
SUPPORTED: dict[str, OpSupport] = {
    "ADD": OpSupport(0, ""),
    "AVERAGE_POOL_2D": OpSupport(0, "No fused activation function.", _no_fused_activation),
    "CONCATENATION": OpSupport(0, "No fused activation function. A constant input only as the "
                               "all-zero half of a 2-input concat.", _concatenation),
    "CONV_2D": OpSupport(0, "Must use the same dilation in x and y dimensions.", _same_dilation),
    "DEPTHWISE_CONV_2D": OpSupport(0, "Runtime <= 12: no dilation; 13+: the same dilation "
                                   "in x and y dimensions.", _same_dilation),
    "EXPAND_DIMS": OpSupport(13, ""),
    "FULLY_CONNECTED": OpSupport(0, "Only the default weights format. Output tensor is "
                                 "one-dimensional.", _fully_connected),
    "L2_NORMALIZATION": OpSupport(0, ""),
    "LOGISTIC": OpSupport(0, ""),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": OpSupport(14, "Unidirectional LSTM only."),
    "MAXIMUM": OpSupport(0, ""),
    "MAX_POOL_2D": OpSupport(0, "No fused activation function.", _no_fused_activation),
    "MEAN": OpSupport(13, "No fused activation function. Reduction along x, y and/or z only.",
                      _mean),
    "MINIMUM": OpSupport(0, ""),
    "MUL": OpSupport(0, ""),
    "PACK": OpSupport(13, "No packing in batch dimension.", _pack),
    "PAD": OpSupport(13, "Padding along x, y and/or z only.", _pad),
    "PRELU": OpSupport(13, "Alpha must be 1-dimensional.", _prelu),
    "QUANTIZE": OpSupport(13, "8-bit to 8-bit requantisation.", _quantize),
    "REDUCE_MAX": OpSupport(14, "Cannot operate on the batch dimension.", _reduce_axes(False)),
    "REDUCE_MIN": OpSupport(14, "Cannot operate on the batch dimension.", _reduce_axes(False)),
    "RELU": OpSupport(0, ""),
    "RELU6": OpSupport(0, ""),
    "RELU_N1_TO_1": OpSupport(0, ""),
    "RESHAPE": OpSupport(0, "Certain reshapes might not be mapped for large tensor sizes."),
    "RESIZE_BILINEAR": OpSupport(0, "Input/output is a 3-dimensional tensor; may stay on the "
                                 "CPU to avoid loss in precision."),
    "RESIZE_NEAREST_NEIGHBOR": OpSupport(0, "Input/output is a 3-dimensional tensor; may stay "
                                         "on the CPU to avoid loss in precision."),
    "RSQRT": OpSupport(14, ""),
    "SLICE": OpSupport(0, ""),
    "SOFTMAX": OpSupport(0, "Only 1-D input with at most 16,000 elements.", _softmax),
    "SPACE_TO_DEPTH": OpSupport(0, ""),
    "SPLIT": OpSupport(0, "No splitting in batch dimension.", _split),
    "SQUARED_DIFFERENCE": OpSupport(14, ""),
    "SQUEEZE": OpSupport(0, "Runtime <= 12: only leading 1s may be squeezed."),
    "STRIDED_SLICE": OpSupport(0, "All strides 1; ellipsis and new-axis masks 0.",
                               _strided_slice),
    "SUB": OpSupport(0, ""),
    "SUM": OpSupport(13, "Cannot operate on the batch dimension.", _reduce_axes(False)),
    "TANH": OpSupport(0, ""),
    "TRANSPOSE": OpSupport(14, ""),
    "TRANSPOSE_CONV": OpSupport(13, ""),
}

# Operators EmbeddingGemma needs that are *not* in [OPS] table 1, with the usual rewrite.
NOT_IN_TABLE_HINTS = {
    "BATCH_MATMUL": "activation x activation matmul (attention QK^T, PV) has no Edge TPU op",
    "GELU": "GELU is not in the table; express it with TANH/MUL/ADD (gelu-tanh)",
    "DEQUANTIZE": "8-bit -> float conversion runs on the CPU",
    "GATHER": "table lookups run on the CPU (keep the embedding lookup on the host)",
    "DIV": "division is not in the table; fold constant divisors into MUL",
    "POW": "POW is not in the table; use MUL (x*x) or SQUARED_DIFFERENCE",
    "SQRT": "SQRT is not in the table; RSQRT is (runtime 14)",
    "EXP": "EXP is not in the table",
    "CAST": "CAST is not in the table",
    "LEAKY_RELU": "LEAKY_RELU is not in the table (Coral: use PRELU)",
}

# [RES] Highest version of each builtin the compiler's embedded TFLite knows.  A model
# with a newer version (or an op this TFLite did not have at all, such as GELU, added
# in 2022) makes the compiler stop before mapping anything: "ERROR: Didn't find op for
# builtin opcode 'RSQRT' version '2'" (google-coral/edgetpu#384, compiler 15).  The
# binary's table is not published; this is the resolver of its TensorFlow generation.
MAX_OP_VERSION: dict[str, int] = {
    "ABS": 4, "ADD": 4, "ADD_N": 1, "ARG_MAX": 3, "ARG_MIN": 3, "AVERAGE_POOL_2D": 3,
    "BATCH_MATMUL": 4, "BATCH_TO_SPACE_ND": 3, "CAST": 4, "CEIL": 1, "CONCATENATION": 3,
    "CONV_2D": 6, "COS": 1, "CUMSUM": 1, "DEPTHWISE_CONV_2D": 6, "DEPTH_TO_SPACE": 2,
    "DEQUANTIZE": 5, "DIV": 2, "ELU": 1, "EQUAL": 3, "EXP": 1, "EXPAND_DIMS": 1,
    "FILL": 3, "FLOOR": 1, "FLOOR_DIV": 2, "FLOOR_MOD": 1, "FULLY_CONNECTED": 9,
    "GATHER": 5, "GATHER_ND": 3, "GREATER": 2, "GREATER_EQUAL": 2, "HARD_SWISH": 1,
    "L2_NORMALIZATION": 2, "LEAKY_RELU": 2, "LESS": 2, "LESS_EQUAL": 2, "LOG": 1,
    "LOGICAL_AND": 1, "LOGICAL_NOT": 1, "LOGICAL_OR": 1, "LOGISTIC": 3, "LOG_SOFTMAX": 2,
    "LSTM": 4, "MAXIMUM": 4, "MAX_POOL_2D": 3, "MEAN": 3, "MINIMUM": 4, "MIRROR_PAD": 2,
    "MUL": 5, "NEG": 1, "NOT_EQUAL": 3, "ONE_HOT": 1, "PACK": 3, "PAD": 4, "PADV2": 4,
    "POW": 1, "PRELU": 1, "QUANTIZE": 3, "REDUCE_MAX": 3, "REDUCE_MIN": 3,
    "REDUCE_PROD": 2, "RELU": 3, "RELU6": 3, "RELU_N1_TO_1": 1, "RESHAPE": 1,
    "RESIZE_BILINEAR": 4, "RESIZE_NEAREST_NEIGHBOR": 4, "REVERSE_V2": 3, "ROUND": 1,
    "RSQRT": 2, "SELECT": 2, "SELECT_V2": 1, "SHAPE": 1, "SIN": 1, "SLICE": 5,
    "SOFTMAX": 3, "SPACE_TO_BATCH_ND": 3, "SPACE_TO_DEPTH": 2, "SPLIT": 4, "SPLIT_V": 2,
    "SQRT": 1, "SQUARE": 1, "SQUARED_DIFFERENCE": 2, "SQUEEZE": 2, "STRIDED_SLICE": 6,
    "SUB": 5, "SUM": 2, "TANH": 3, "TILE": 3, "TOPK_V2": 2, "TRANSPOSE": 5,
    "TRANSPOSE_CONV": 3, "UNIDIRECTIONAL_SEQUENCE_LSTM": 3, "UNPACK": 4, "WHERE": 2,
    "ZEROS_LIKE": 1,
}

# Inputs that hold parameters for these ops: (filter, bias) [REQ] "Model parameters
# (such as bias tensors) are constant at compile-time."
PARAMETER_INPUTS = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2),
                    "TRANSPOSE_CONV": (1, 3)}


def unknown_to_compiler(op: Operator) -> Optional[str]:
    """The compiler's parse error for ``op``, or None if its TFLite knows the op."""
    if op.op.startswith("CUSTOM:"):
        return None
    known = MAX_OP_VERSION.get(op.op)
    if known is None or op.version > known:
        return f"Didn't find op for builtin opcode '{op.op}' version '{op.version}'"
    return None


def check_operator(op: Operator, g: Graph, min_runtime: int) -> Optional[Finding]:
    """The reason ``op`` cannot map on its own, or None if it can (before the cut rule)."""
    if op.op.startswith("CUSTOM:"):
        return Finding(NOT_SUPPORTED, f"custom op {op.op[7:]!r}", f"{OPS_DOC} [LOG]")
    support = SUPPORTED.get(op.op)
    if support is None:
        hint = NOT_IN_TABLE_HINTS.get(op.op, "not in the supported-operations table")
        return Finding(NOT_SUPPORTED, hint, f"{OPS_DOC} (not listed) [LOG]")
    if support.min_runtime > min_runtime:
        return Finding(NOT_SUPPORTED, f"needs Edge TPU runtime {support.min_runtime}+, "
                       f"compiling for runtime {min_runtime} (-m)", f"{OPS_DOC} (runtime version)")
    tensors = g.op_inputs(op) + g.op_outputs(op)
    for t in tensors:
        # [REQ] "Tensor sizes are constant at compile-time (no dynamic sizes)."
        if t.dynamic:
            return Finding(UNSPECIFIED, f"tensor {_name(t)} has a dynamic shape "
                           f"{list(t.signature)}", REQ_DOC)
    skip_dtype = {op.inputs[0]} if op.op == "QUANTIZE" and op.inputs else set()
    for t in tensors:
        # [REQ] "Tensor parameters are quantized (8-bit fixed-point numbers; int8 or uint8)."
        # int32 is how TFLite stores 8-bit models' biases, shapes and axes.
        if t.index in skip_dtype:
            continue
        ok = EIGHT_BIT + ("int32", "int64") if t.constant else EIGHT_BIT
        if t.dtype not in ok:
            return Finding(BAD_DTYPE, f"tensor {_name(t)} is {t.dtype}", f"{REQ_DOC} [LOG]")
    for t in tensors:
        # [REQ] "If a tensor has more than 3 dimensions, then only the 3 innermost
        # dimensions may have a size greater than 1" (this is also the batch-1 rule).
        if not t.constant and any(d > 1 for d in t.shape[:-3]):
            return Finding(BAD_RANK, f"tensor {_name(t)} {list(t.shape)} has a dimension > 1 "
                           "outside the 3 innermost", f"{REQ_DOC} [LOG]")
    for i in PARAMETER_INPUTS.get(op.op, ()):
        t = _inp(op, g, i)
        if t is not None and not t.constant:
            return Finding(UNSPECIFIED, f"parameter input {i} ({_name(t)}) is not a "
                           "compile-time constant", REQ_DOC)
    return support.check(op, g) if support.check else None
