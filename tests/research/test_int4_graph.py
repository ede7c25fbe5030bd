"""research/int4_graph.py: the layer sets and recipe regex that choose linears of the float
export's graph, and ai-edge-quantizer's Hadamard-rotated int4 on a hand-built graph."""

from __future__ import annotations

import re

import numpy as np
import pytest

from research.int4_graph import linear_regex, parse_layers

# an output tensor name as litert-torch writes it (the quantiser's op scope adds the ";")
NAME = ("gemma_edge.export.convert._Named/gemma_edge.export.encoder.BucketEncoder_inner/"
        "gemma_edge.export.encoder.EncoderLayer_{}/torch.nn.modules.linear.Linear_{};1;")
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_layer_sets():
    assert parse_layers("all") == list(range(24))
    assert parse_layers("5-10,12-15") == [5, 6, 7, 8, 9, 10, 12, 13, 14, 15]
    assert parse_layers("3") == [3]
    with pytest.raises(ValueError):
        parse_layers("20-24")


def test_the_regex_selects_exactly_the_chosen_layers_linears():
    def chosen(regex):
        return {(i, n) for i in range(24) for n in LINEARS if re.search(regex, NAME.format(i, n))}

    assert chosen(linear_regex([1, 5, 12])) == {(i, n) for i in (1, 5, 12)
                                                 for n in ("gate_up_proj", "down_proj")}
    assert len(chosen(linear_regex(range(24), ("mlp", "attn")))) == 96
    assert chosen(linear_regex([0], ("attn",))) == {(0, "qkv_proj"), (0, "o_proj")}
    # a non-linear op's scope that names two layers
    assert not re.search(linear_regex(range(24), ("mlp", "attn")),
                         "x.EncoderLayer_1;;x.EncoderLayer_0;3;")


def _two_linears(w1: np.ndarray, w2: np.ndarray, tokens: int) -> bytes:
    """x [tokens, in] -> FULLY_CONNECTED w1 -> FULLY_CONNECTED w2, float32, no bias, the
    linears' tensors named as in the export."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    m = s.ModelT()
    m.version = 3
    m.buffers = [s.BufferT()]

    def tensor(name, shape, data=None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), s.TensorType.FLOAT32, 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(data.tobytes(), np.uint8)
            m.buffers.append(b)
            t.buffer = len(m.buffers) - 1
        return t

    def fc(i, w, o):
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [i, w, -1], [o]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = s.FullyConnectedOptionsT()
        return op

    name = NAME.format(0, "{}")[:-3]
    sg = s.SubGraphT()
    sg.tensors = [tensor("x", (tokens, w1.shape[1])),
                  tensor(name.format("gate_up_proj"), w1.shape, w1),
                  tensor(name.format("gate_up_proj") + ";1", (tokens, w1.shape[0])),
                  tensor(name.format("down_proj"), w2.shape, w2),
                  tensor(name.format("down_proj") + ";1", (tokens, w2.shape[0]))]
    sg.operators = [fc(0, 1, 2), fc(2, 3, 4)]
    sg.inputs, sg.outputs = [0], [4]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    m.operatorCodes, m.subgraphs = [code], [sg]
    b = flatbuffers.Builder(0)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_hadamard_int4_rotates_the_inputs_in_the_graph():
    """768 and 1152 are not powers of two: the quantiser rotates blocks of 256 and 128
    (the largest power of two dividing the width) with a float FULLY_CONNECTED between
    two RESHAPEs; XNNPACK runs the whole graph and gives the rotated codes' product."""
    pytest.importorskip("ai_edge_quantizer")
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.export.gptq import int4_tensors
    from research.int4_graph import graph_ops, quantize_graph

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((1152, 768)).astype(np.float32) * 0.03
    w1[:, 5] *= 20  # an outlier input channel: what the rotation spreads
    w2 = rng.standard_normal((768, 1152)).astype(np.float32) * 0.03
    x = rng.standard_normal((16, 768)).astype(np.float32)
    model = _two_linears(w1, w2, 16)

    def run(graph):
        interp = Interpreter(model_content=graph, num_threads=1)
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        return interp.get_tensor(interp.get_output_details()[0]["index"])

    def hadamard(n):
        h = np.ones((1, 1))
        while len(h) < n:
            h = np.kron(h, [[1, 1], [1, -1]])
        return h / np.sqrt(n)

    def rotate(a, n):
        return (a.reshape(-1, n) @ hadamard(n)).reshape(a.shape)

    ref = x @ w1.T @ w2.T
    err = {}
    for rotated in (False, True):
        graph = quantize_graph(model, [0], ("mlp",), hadamard=rotated)
        ops = next(iter(graph_ops(graph)["subgraphs"].values()))
        assert ops["int4_tensors"] == 2
        y = run(graph)
        err[rotated] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        if rotated:
            assert ops["ops"] == {"FULLY_CONNECTED": 4, "RESHAPE": 4}
            assert ops["hadamard_matrices_by_size"] == {256: 1, 128: 1}
            q = {n.split("Linear_")[1]: c * s[:, None] for n, c, s in int4_tensors(graph)}
            want = rotate(rotate(x, 256) @ q["gate_up_proj"].T, 128) @ q["down_proj"].T
            assert np.linalg.norm(y - want) / np.linalg.norm(want) < 0.02
        else:
            assert ops["ops"] == {"FULLY_CONNECTED": 2}
    assert err[True] < 0.5 * err[False]


def test_delegation_report_of_a_hand_built_graph(tmp_path):
    pytest.importorskip("ai_edge_quantizer")
    from research.int4_graph import delegation, quantize_graph

    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((256, 128)).astype(np.float32)
    w2 = rng.standard_normal((128, 256)).astype(np.float32)
    path = tmp_path / "g.tflite"
    path.write_bytes(quantize_graph(_two_linears(w1, w2, 4), [0], ("mlp",)))
    report = delegation(path)
    assert report["nodes_by_op"] == {"FULLY_CONNECTED": 4, "RESHAPE": 4}
    assert report["all_delegated"]
