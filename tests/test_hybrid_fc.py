"""export/hybrid_fc.py: per-channel hybrid FULLY_CONNECTED -> per-tensor FC + MUL (issue 24).

tflite-runtime 2.14 (the boards' runtime) computes a FULLY_CONNECTED with float input and
per-channel int8 weights as zeros; the rewritten op must compute what the original
computes on ai-edge-litert. The graphs here are built directly with LiteRT's schema (one
op, no conversion), so these tests take well under a second; the tiny export's graphs are
checked in tests/test_export.py and, on tflite-runtime itself, by `make board-check`.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from gemma_edge.errors import QuantizationError  # noqa: E402
from gemma_edge.export.hybrid_fc import channel_scales_to_mul, per_channel_hybrid_fc  # noqa: E402
from gemma_edge.export.signatures import pack_model  # noqa: E402

RELU = 1


def hybrid_fc_model(weights: np.ndarray, scales: np.ndarray, rows: int,
                    bias: np.ndarray | None = None, activation: int = 0,
                    zero_points: np.ndarray | None = None) -> bytes:
    """A one-op graph as ai-edge-quantizer's dynamic_wi8_afp32 writes it: FULLY_CONNECTED
    (version 5), float input [rows, K], int8 weights [N, K] with one scale per output
    channel, optional float bias, float output [rows, N]."""
    from ai_edge_litert import schema_py_generated as schema

    def buffer(data: bytes = b"") -> schema.BufferT:
        b = schema.BufferT()
        if data:
            b.data = np.frombuffer(data, np.uint8)
        return b

    def tensor(name: str, shape: tuple, kind: int, buf: int = 0) -> schema.TensorT:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), np.array(shape, np.int32), kind, buf
        return t

    n, k = weights.shape
    tree = schema.ModelT()
    tree.version, tree.description = 3, b"test"
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 5
    tree.operatorCodes = [code]
    tree.buffers = [buffer(), buffer(weights.astype(np.int8).tobytes())]
    w = tensor("w", (n, k), schema.TensorType.INT8, 1)
    w.quantization = schema.QuantizationParametersT()
    w.quantization.scale = [float(s) for s in scales]
    w.quantization.zeroPoint = [int(z) for z in (np.zeros(n) if zero_points is None
                                                  else zero_points)]
    w.quantization.quantizedDimension = 0
    tensors = [tensor("x", (rows, k), schema.TensorType.FLOAT32), w,
               tensor("y", (rows, n), schema.TensorType.FLOAT32)]
    inputs = [0, 1, -1]
    if bias is not None:
        tree.buffers.append(buffer(bias.astype("<f4").tobytes()))
        tensors.append(tensor("b", (n,), schema.TensorType.FLOAT32, 2))
        inputs[2] = 3
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, np.array(inputs, np.int32), np.array([2], np.int32)
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    op.builtinOptions.fusedActivationFunction = activation
    sub = schema.SubGraphT()
    sub.tensors, sub.operators = tensors, [op]
    sub.inputs, sub.outputs = np.array([0], np.int32), np.array([2], np.int32)
    tree.subgraphs = [sub]
    return pack_model(b"", tree)


def run(model: bytes, x: np.ndarray, resolver: str = "AUTO") -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=model,
                     experimental_op_resolver_type=getattr(OpResolverType, resolver))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def case(seed: int = 0, n: int = 24, k: int = 40, rows: int = 5):
    rng = np.random.default_rng(seed)
    weights = rng.integers(-127, 128, (n, k))
    scales = np.exp(rng.uniform(-9, -3, n)).astype(np.float32)  # ranges 400x apart
    x = rng.normal(0, 1, (rows, k)).astype(np.float32)
    return weights, scales, x


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("resolver", ["AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"])
def test_rewritten_fc_computes_what_the_per_channel_fc_computes(resolver):
    weights, scales, x = case()
    model = hybrid_fc_model(weights, scales, len(x))
    fixed = channel_scales_to_mul(model)
    want = x @ (weights * scales[:, None]).T
    before, after = run(model, x, resolver), run(fixed, x, resolver)
    # int8 inputs quantised at run time: ~1% of the largest output, either way
    assert relative_error(before, want) < 0.02 and relative_error(after, want) < 0.02
    if resolver == "AUTO":  # XNNPACK: the scale after the int32 sum instead of within it
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_rewritten_graph_form_and_idempotence():
    from ai_edge_litert import schema_py_generated as schema

    weights, scales, x = case(1)
    model = hybrid_fc_model(weights, scales, len(x))
    assert per_channel_hybrid_fc(model) == 1
    fixed = channel_scales_to_mul(model)
    assert per_channel_hybrid_fc(fixed) == 0
    assert channel_scales_to_mul(fixed) is fixed  # nothing left to rewrite

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(fixed, 0))
    sub = tree.subgraphs[0]
    codes = [tree.operatorCodes[op.opcodeIndex].builtinCode for op in sub.operators]
    assert codes == [schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.MUL]
    fc, mul = sub.operators
    w = sub.tensors[fc.inputs[1]]
    assert list(w.quantization.scale) == [1.0] and list(w.quantization.zeroPoint) == [0]
    assert fc.builtinOptions.asymmetricQuantizeInputs
    assert list(mul.inputs) == [fc.outputs[0], len(sub.tensors) - 2]
    assert list(mul.outputs) == [2] and list(sub.outputs) == [2]  # the graph's output
    channel = sub.tensors[mul.inputs[1]]
    stored = np.frombuffer(tree.buffers[channel.buffer].data.tobytes(), "<f4")
    np.testing.assert_array_equal(stored, scales)
    # the int8 weights are kept bit for bit
    from gemma_edge.export.signatures import buffer_bytes

    assert buffer_bytes(fixed, tree.buffers[w.buffer]) == weights.astype(np.int8).tobytes()


def test_bias_and_fused_activation_move_with_the_scales():
    weights, scales, x = case(2)
    bias = np.random.default_rng(3).normal(0, 0.05, len(scales)).astype(np.float32)
    model = hybrid_fc_model(weights, scales, len(x), bias=bias, activation=RELU)
    fixed = channel_scales_to_mul(model)
    want = np.maximum(x @ (weights * scales[:, None]).T + bias, 0)
    got = run(fixed, x)
    assert (got >= 0).all() and relative_error(got, want) < 0.02
    np.testing.assert_allclose(got, run(model, x), rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_asymmetric_weights_are_refused():
    weights, scales, x = case(4)
    zero = np.zeros(len(scales), np.int64)
    zero[3] = 5
    with pytest.raises(QuantizationError, match="expected symmetric scales"):
        channel_scales_to_mul(hybrid_fc_model(weights, scales, len(x), zero_points=zero))
