"""Read just what the Edge TPU pre-flight needs from a ``.tflite`` flatbuffer.

Uses the accessor API of ``ai_edge_litert.schema_py_generated`` (imported when a
model is read, never at module import) on a memory map, so a 300 MB int8 graph
is not copied into Python objects: buffer sizes are read from the table, and
only small constants (axes, strides, paddings: the operands the per-op limits
look at) are copied out.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gemma_edge.errors import InputError

TFLITE_IDENTIFIER = b"TFL3"
SMALL_CONSTANT = 64  # elements: enough for axis / stride / padding operands
ZERO_SCAN_BYTES = 4 << 20  # constants up to this size are scanned for "all zeroes"
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"

_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64",
           "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16",
           "INT32": "int32", "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64",
           "BOOL": "bool", "INT4": "int4", "BFLOAT16": "bfloat16"}


@dataclass
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    signature: tuple[int, ...]  # shape_signature; -1 marks a dynamic dimension
    dtype: str
    constant: bool  # backed by a non-empty buffer: a compile-time constant
    nbytes: int  # bytes of the constant buffer, 0 for activations
    buffer: int  # buffer index, so weights shared by two ops count once
    quantized: bool  # carries scale/zero-point parameters
    values: Optional[tuple[Any, ...]] = None  # contents of small constants
    all_zero: Optional[bool] = None  # None when not scanned

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= max(int(dim), 0)
        return count

    @property
    def activation_bytes(self) -> int:
        """Bytes of one instance of this tensor when it is computed at run time."""
        width = {"int8": 1, "uint8": 1, "int16": 2, "float16": 2, "int32": 4,
                 "float32": 4, "int64": 8}.get(self.dtype, 4)
        return self.elements * width

    @property
    def dynamic(self) -> bool:
        return any(int(d) < 0 for d in self.signature)


@dataclass
class Operator:
    index: int
    op: str  # builtin name ("FULLY_CONNECTED") or "CUSTOM:<code>"
    version: int
    inputs: tuple[int, ...]  # -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)  # scalar builtin options


@dataclass
class Graph:
    index: int
    name: str
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def tensor(self, index: int) -> Optional[Tensor]:
        return self.tensors[index] if 0 <= index < len(self.tensors) else None

    def op_inputs(self, op: Operator) -> list[Tensor]:
        return [t for t in (self.tensor(i) for i in op.inputs) if t is not None]

    def op_outputs(self, op: Operator) -> list[Tensor]:
        return [t for t in (self.tensor(i) for i in op.outputs) if t is not None]


@dataclass
class Model:
    path: Path
    size: int
    schema_version: int
    description: str
    graphs: list[Graph]
    signatures: list[str]

    @property
    def compiled_for_edgetpu(self) -> bool:
        return any(op.op == f"CUSTOM:{EDGETPU_CUSTOM_OP}" for g in self.graphs
                   for op in g.operators)


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise InputError("reading .tflite files needs ai-edge-litert (pip install "
                         "'gemma-edge[runtime]')") from exc
    return schema_py_generated


def _names(enum_cls: Any) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def read_model(path: Path) -> Model:
    """Parse ``path``; raise InputError if it is not a readable TFLite flatbuffer."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 16:
        raise InputError(f"{path}: {size} bytes, too small to be a .tflite model")
    # The map is not closed explicitly: numpy views of it may outlive this call
    # (in a traceback, say), and the map is released when the last one goes.
    with open(path, "rb") as handle:
        mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if mm[4:8] != TFLITE_IDENTIFIER:
        raise InputError(f"{path}: not a TFLite flatbuffer (file identifier "
                         f"{bytes(mm[4:8])!r}, expected {TFLITE_IDENTIFIER!r})")
    try:
        return _parse(path, size, mm)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt flatbuffer fails in many ways
        raise InputError(f"{path}: corrupt TFLite flatbuffer ({type(exc).__name__}: {exc}); "
                         "re-export the model") from exc


def _parse(path: Path, size: int, data: Any) -> Model:
    s = _schema()
    root = s.Model.GetRootAs(data, 0)
    op_names = _names(s.BuiltinOperator)
    type_names = _names(s.TensorType)
    codes = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
        if builtin == s.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            name = "CUSTOM:" + (custom.decode("utf-8", "replace") if custom else "?")
        else:
            name = op_names.get(builtin, f"BUILTIN_{builtin}")
        codes.append((name, int(code.Version()) or 1))
    buffers = [_buffer_info(root.Buffers(i), data) for i in range(root.BuffersLength())]
    graphs = [_graph(s, root.Subgraphs(g), g, codes, buffers, type_names)
              for g in range(root.SubgraphsLength())]
    signatures = []
    for i in range(root.SignatureDefsLength()):
        key = root.SignatureDefs(i).SignatureKey()
        signatures.append(key.decode() if key else str(i))
    desc = root.Description()
    return Model(path=path, size=size, schema_version=int(root.Version()),
                 description=desc.decode("utf-8", "replace") if desc else "",
                 graphs=graphs, signatures=signatures)


def _buffer_info(buf: Any, data: Any) -> tuple[int, Optional[int]]:
    """(size in bytes, absolute file offset of the data or None)."""
    if buf is None:
        return 0, None
    offset = int(buf.Offset())
    if offset > 1:  # large models keep buffer data after the flatbuffer
        return int(buf.Size()), offset
    length = int(buf.DataLength())
    if length == 0:
        return 0, None
    vector = buf._tab.Vector(buf._tab.Offset(4))  # start of the ubyte vector
    return length, int(vector)


def _graph(s: Any, sg: Any, index: int, codes: list[tuple[str, int]],
           buffers: list[tuple[int, Optional[int]]], type_names: dict[int, str]) -> Graph:
    import numpy as np

    data = sg._tab.Bytes
    tensors = []
    for t in range(sg.TensorsLength()):
        ten = sg.Tensors(t)
        shape = tuple(int(d) for d in ten.ShapeAsNumpy()) if ten.ShapeLength() else ()
        sig = (tuple(int(d) for d in ten.ShapeSignatureAsNumpy())
               if ten.ShapeSignatureLength() else shape)
        dtype = _DTYPES.get(type_names.get(ten.Type(), ""), type_names.get(ten.Type(), "?").lower())
        nbytes, offset = buffers[ten.Buffer()] if 0 <= ten.Buffer() < len(buffers) else (0, None)
        quant = ten.Quantization()
        tensor = Tensor(index=t, name=(ten.Name() or b"").decode("utf-8", "replace"),
                        shape=shape, signature=sig, dtype=dtype, constant=nbytes > 0,
                        nbytes=nbytes, buffer=int(ten.Buffer()),
                        quantized=quant is not None and quant.ScaleLength() > 0)
        if offset is not None and dtype in ("int8", "uint8", "int16", "int32", "int64", "float32"):
            raw = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset) \
                if offset + nbytes <= len(data) else None
            if raw is not None:
                if nbytes <= ZERO_SCAN_BYTES:
                    tensor.all_zero = not bool(raw.any())
                if tensor.elements <= SMALL_CONSTANT:
                    tensor.values = tuple(np.frombuffer(raw.tobytes(), dtype=dtype).tolist())
        tensors.append(tensor)
    operators = []
    for o in range(sg.OperatorsLength()):
        op = sg.Operators(o)
        name, version = codes[op.OpcodeIndex()]
        options: dict[str, Any] = {}
        table = op.BuiltinOptions()
        if table is not None and op.BuiltinOptionsType():
            obj = s.BuiltinOptionsCreator(op.BuiltinOptionsType(), table)
            options = {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}
        operators.append(Operator(
            index=o, op=name, version=version,
            inputs=tuple(int(i) for i in op.InputsAsNumpy()) if op.InputsLength() else (),
            outputs=tuple(int(i) for i in op.OutputsAsNumpy()) if op.OutputsLength() else (),
            options=options))
    name = sg.Name()
    return Graph(index=index, name=name.decode() if name else f"subgraph {index}",
                 tensors=tensors, operators=operators,
                 inputs=tuple(int(i) for i in sg.InputsAsNumpy()) if sg.InputsLength() else (),
                 outputs=tuple(int(i) for i in sg.OutputsAsNumpy()) if sg.OutputsLength() else ())
