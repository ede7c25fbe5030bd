"""The CPU int8 graph's FULLY_CONNECTED ops in a form tflite-runtime 2.14 computes.

Why (issue 24): ai-edge-quantizer's ``dynamic_wi8_afp32`` recipe writes every
FULLY_CONNECTED as a "hybrid" op: float input, int8 weights with one scale per output
channel (``quantized_dimension`` 0), no bias. ai-edge-litert 2.3 runs it (XNNPACK's
dynamically quantised kernel takes a scale per channel). tflite-runtime 2.14, the last
release and the only runtime for ARMv8.0 boards (Pi 3/4, Coral Dev Board), does not:
its hybrid FULLY_CONNECTED kernel (reference and optimised alike; XNNPACK on or off gives
the same zeros: 2.14's XNNPACK leaves hybrid ops to the builtin kernel) multiplies each row's dynamic input
scale by ``filter->params.scale``, the tensor's single legacy scale, and the interpreter
fills that legacy scale only when a tensor has exactly ONE scale (``GetLegacyQuantization``),
else 0. Per-channel weights therefore give 0 * accumulator: the op's output is all zero,
and so is the embedding. (Per-channel FULLY_CONNECTED came with later converters; 2.14's
CONV_2D has a per-channel hybrid kernel, its FULLY_CONNECTED has not.)

The fix keeps the int8 weights bit for bit and moves the channel scales out of them:

    y = x . (diag(s) Wq)^T = (x . Wq^T) * s

each such op becomes FULLY_CONNECTED with the same int8 weights declared per-tensor with
scale 1.0, followed by a MUL by the float vector ``s`` (one float per output channel,
0.5 MB for the 300M model; the files get ~1 MB smaller per bucket, as the per-channel
form also stored an int64 zero point per channel). The FULLY_CONNECTED also asks for
asymmetric dynamic input quantisation (a zero point per input row), as XNNPACK's kernel
does anyway, which brings tflite-runtime's builtin kernel closest to ai-edge-litert (see
``_scale_output``). On ai-edge-litert the vectors stay bit for bit those of the
per-channel graph (measured: max abs difference 0.0 on the tiny export and on the 300M
model; docs/board-check.md has the figures). A fused activation moves to the MUL and a
float bias is divided by ``s`` (y = (x . Wq^T + b/s) * s); the export's graphs have
neither today. Requantising the weights per tensor (the quantizer's per-tensor option)
would run on 2.14 too but loses precision in every channel with a small range; a
DEQUANTIZE to float weights would keep 4x the weight memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_edge.errors import QuantizationError

from .signatures import buffer_bytes, pack_model


def per_channel_hybrid_fc(model: bytes) -> int:
    """How many FULLY_CONNECTED ops take a float input and per-channel int8 weights (the
    form tflite-runtime 2.14 computes as zeros)."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    count = 0
    for s in range(root.SubgraphsLength()):
        sub = root.Subgraphs(s)
        for i in range(sub.OperatorsLength()):
            op = sub.Operators(i)
            code = root.OperatorCodes(op.OpcodeIndex())
            if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != \
                    schema.BuiltinOperator.FULLY_CONNECTED or op.InputsLength() < 2:
                continue
            x, w = sub.Tensors(op.Inputs(0)), sub.Tensors(op.Inputs(1))
            q = w.Quantization()
            if (x.Type() == schema.TensorType.FLOAT32 and w.Type() == schema.TensorType.INT8
                    and q is not None and q.ScaleLength() > 1):
                count += 1
    return count


def channel_scales_to_mul(model: bytes) -> bytes:
    """``model`` with each hybrid per-channel FULLY_CONNECTED rewritten as per-tensor
    FULLY_CONNECTED (scale 1.0, same int8 weights) + MUL by the channel scales (see the
    module's docstring); ``model`` itself when it has none. Idempotent."""
    if not per_channel_hybrid_fc(model):
        return model
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    mul_code = _opcode_index(tree, schema.BuiltinOperator.MUL, schema)
    fc_code = schema.BuiltinOperator.FULLY_CONNECTED
    shared: dict[int, int] = {}  # weight buffer -> its scales' buffer (across subgraphs)
    for sub in tree.subgraphs or []:
        operators = []
        done: dict[int, int] = {}  # weight tensor -> its scales tensor (shared weights)
        for op in sub.operators or []:
            operators.append(op)
            code = tree.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != fc_code:
                continue
            inputs = [int(t) for t in op.inputs]
            if len(inputs) < 2 or inputs[1] < 0:
                continue
            x, w = sub.tensors[inputs[0]], sub.tensors[inputs[1]]
            if inputs[1] not in done:
                q = w.quantization
                if (x.type != schema.TensorType.FLOAT32 or w.type != schema.TensorType.INT8
                        or q is None or q.scale is None or len(q.scale) < 2):
                    continue
                done[inputs[1]] = _move_scales(tree, sub, w, shared, schema)
            scales_index = done[inputs[1]]
            operators.append(_scale_output(model, tree, sub, op, scales_index, mul_code,
                                           schema))
        sub.operators = operators
    return pack_model(model, tree)


def _move_scales(tree: Any, sub: Any, weight: Any, shared: dict[int, int],
                 schema: Any) -> int:
    """Declare ``weight`` per-tensor (scale 1.0) and add its former channel scales as a
    float constant tensor; that tensor's index. The buckets of a multi-signature file
    share weight buffers, so they share the scales' buffer too (``shared``)."""
    q = weight.quantization
    scales = np.asarray(q.scale, np.float32)
    zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0])
    if np.any(zero != 0) or q.quantizedDimension != 0:
        raise QuantizationError(
            f"hybrid FULLY_CONNECTED weights {_text(weight.name)!r}: expected symmetric "
            f"scales on the output channel (dimension 0), got zero points "
            f"{sorted(set(zero.tolist()))[:4]} on dimension {q.quantizedDimension}")
    if len(scales) != int(weight.shape[0]) or not np.all(scales > 0):
        raise QuantizationError(f"hybrid FULLY_CONNECTED weights {_text(weight.name)!r}: "
                                f"{len(scales)} scales for {int(weight.shape[0])} channels")
    weight.quantization = schema.QuantizationParametersT()
    weight.quantization.scale = [1.0]
    weight.quantization.zeroPoint = [0]
    weight.quantization.quantizedDimension = 0
    reuse = shared.get(weight.buffer)
    if reuse is not None and bytes(tree.buffers[reuse].data) != scales.astype("<f4").tobytes():
        reuse = None  # same weights, other scales: not written by ai-edge-quantizer
    index = _constant(tree, sub, scales, f"{_text(weight.name)}/channel_scales", schema,
                      buffer=reuse)
    shared[weight.buffer] = sub.tensors[index].buffer
    return index


def _scale_output(model: bytes, tree: Any, sub: Any, fc: Any, scales_index: int,
                  mul_code: int, schema: Any) -> Any:
    """Point ``fc`` at a new float tensor and return the MUL (by the scales) that writes
    the FC's former output; the fused activation moves to the MUL, a bias is divided by
    the scales."""
    out_index = int(fc.outputs[0])
    out = sub.tensors[out_index]
    raw = schema.TensorT()
    raw.shape = None if out.shape is None else np.array(out.shape, np.int32)
    raw.shapeSignature = None if out.shapeSignature is None else \
        np.array(out.shapeSignature, np.int32)
    raw.type, raw.buffer, raw.hasRank = out.type, 0, out.hasRank
    raw.name = f"{_text(out.name)}/unscaled".encode()
    sub.tensors.append(raw)
    raw_index = len(sub.tensors) - 1
    fc.outputs = np.array([raw_index] + [int(t) for t in fc.outputs[1:]], np.int32)

    if fc.builtinOptions is None:
        fc.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
        fc.builtinOptions = schema.FullyConnectedOptionsT()
    activation = fc.builtinOptions.fusedActivationFunction
    fc.builtinOptions.fusedActivationFunction = 0
    # Quantise each input row with a scale AND a zero point, as XNNPACK's dynamically
    # quantised kernel (ai-edge-litert) always does. tflite-runtime's builtin kernel vs
    # ai-edge-litert, symmetric -> asymmetric rows: tiny export cosine 0.99986 -> equal bit
    # for bit; 300M model (one 64-token bucket, 3 texts) 0.99660 -> 0.99769 to
    # ai-edge-litert and 0.99739 -> 0.99843 to the float graph (ai-edge-litert: 0.99833).
    # ai-edge-litert's own vectors do not change (XNNPACK ignores the flag).
    fc.builtinOptions.asymmetricQuantizeInputs = True
    inputs = [int(t) for t in fc.inputs]
    if len(inputs) > 2 and inputs[2] >= 0:
        bias = sub.tensors[inputs[2]]
        data = _constant_value(model, tree, bias)
        scales = _constant_value(model, tree, sub.tensors[scales_index])
        if data is None or bias.type != schema.TensorType.FLOAT32:
            raise QuantizationError(f"hybrid FULLY_CONNECTED bias {_text(bias.name)!r} is "
                                    "not a float constant")
        inputs[2] = _constant(tree, sub, data / scales, f"{_text(bias.name)}/unscaled", schema)
        fc.inputs = np.array(inputs, np.int32)

    mul = schema.OperatorT()
    mul.opcodeIndex = mul_code
    mul.inputs = np.array([raw_index, scales_index], np.int32)
    mul.outputs = np.array([out_index], np.int32)
    mul.builtinOptionsType = schema.BuiltinOptions.MulOptions
    mul.builtinOptions = schema.MulOptionsT()
    mul.builtinOptions.fusedActivationFunction = activation
    return mul


def _constant(tree: Any, sub: Any, value: np.ndarray, name: str, schema: Any,
              buffer: Any = None) -> int:
    """A new float32 constant tensor in ``sub`` holding ``value`` (in a new buffer, or in
    ``buffer``, an existing one with the same bytes); its index."""
    if buffer is None:
        new = schema.BufferT()
        new.data = np.frombuffer(np.ascontiguousarray(value, "<f4").tobytes(), np.uint8)
        tree.buffers.append(new)
        buffer = len(tree.buffers) - 1
    tensor = schema.TensorT()
    tensor.shape = np.array(value.shape, np.int32)
    tensor.type, tensor.buffer = schema.TensorType.FLOAT32, buffer
    tensor.name = name.encode()
    sub.tensors.append(tensor)
    return len(sub.tensors) - 1


def _constant_value(model: bytes, tree: Any, tensor: Any) -> Any:
    """A float32 tensor's constant value (None when it has no data)."""
    data = buffer_bytes(model, tree.buffers[tensor.buffer]) if tensor.buffer else b""
    return np.frombuffer(data, "<f4").astype(np.float32) if data else None


def _opcode_index(tree: Any, builtin: int, schema: Any) -> int:
    for i, code in enumerate(tree.operatorCodes or []):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and not code.customCode:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    tree.operatorCodes.append(code)
    return len(tree.operatorCodes) - 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
