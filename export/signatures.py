"""One signature of a multi-signature TFLite file as a file of its own.

Why: the CPU int8 export needs both forms of the same graphs - one file with every
bucket (CompiledModel + XNNPACK's weight cache packs the shared weights once) and one
file per bucket (the plain Interpreter packs every signature of a file when it opens it).
Converting each bucket again with litert-torch cost 7 more conversions (~8 core-minutes
of the export on the 2-core reference machine); cutting the bucket's subgraph out of the
already quantised one-file graph gives the same weights and ops. No library does this
cut (ai-edge-quantizer and the LiteRT flatbuffer tools read, modify and write whole
models), so it is written here on LiteRT's own schema and flatbuffer helpers, with the
weights laid out as ai-edge-quantizer lays them out: after the flatbuffer, 16-byte
aligned, referenced by offset and size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_edge.errors import QuantizationError

_ALIGN = 16
_INLINE_MAX = 1024  # small buffers (metadata such as min_runtime_version) stay inline


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def buffer_bytes(model: bytes, buffer: Any) -> bytes:
    """A buffer's contents, inline or stored after the flatbuffer (offset > 1)."""
    if buffer.offset and buffer.offset > 1:
        if buffer.offset + buffer.size > len(model):
            raise QuantizationError("a weight buffer points past the end of the model file")
        return bytes(model[buffer.offset:buffer.offset + buffer.size])
    return b"" if buffer.data is None else np.asarray(buffer.data, np.uint8).tobytes()


def signature_keys(model: bytes) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    return [root.SignatureDefs(i).SignatureKey().decode()
            for i in range(root.SignatureDefsLength())]


def extract_signature(model: bytes, key: str) -> bytes:
    """The TFLite file of signature ``key`` alone: its subgraph, the buffers it uses, the
    metadata; every operator code kept (indices stay valid)."""
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    matches = [s for s in tree.signatureDefs or [] if _text(s.signatureKey) == key]
    if len(matches) != 1:
        raise QuantizationError(f"signature {key!r} not in the model (it has "
                                f"{', '.join(signature_keys(model)) or 'none'})")
    signature = matches[0]
    subgraph = tree.subgraphs[signature.subgraphIndex]

    order: list[int] = [0]  # buffer 0 is the empty sentinel of every TFLite model
    remap = {0: 0}

    def keep(index: int) -> int:
        if index not in remap:
            remap[index] = len(order)
            order.append(index)
        return remap[index]

    for tensor in subgraph.tensors or []:
        tensor.buffer = keep(tensor.buffer)
    for meta in tree.metadata or []:
        meta.buffer = keep(meta.buffer)

    tree.buffers = [tree.buffers[old] for old in order]
    signature.subgraphIndex = 0
    tree.subgraphs, tree.signatureDefs = [subgraph], [signature]
    return pack_model(model, tree)


def pack_model(model: bytes, tree: Any) -> bytes:
    """Serialise ``tree`` (a ``ModelT`` read from ``model``, possibly edited) as a TFLite
    file: each buffer's bytes (stored after ``model``'s flatbuffer or inline; a new
    ``BufferT`` carries them inline) laid out as ai-edge-quantizer lays them out: up to
    1 KiB inline, larger ones after the flatbuffer, 16-byte aligned. Buffer 0 stays the
    empty sentinel."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    buffers, external = [], {}
    for new, old in enumerate(tree.buffers or []):
        data = buffer_bytes(model, old) if new else b""
        buffer = schema.BufferT()
        if len(data) > _INLINE_MAX:
            buffer.offset, buffer.size = 1, 1  # placeholders, so the fields are written
            external[new] = data
        elif data:
            buffer.data = np.frombuffer(data, np.uint8)
        buffers.append(buffer)
    tree.buffers = buffers

    head = flatbuffer_utils.convert_object_to_bytearray(tree)
    out = bytearray(head)
    packed = schema.Model.GetRootAs(out, 0)
    position = _round_up(len(out))
    for index, data in external.items():
        out.extend(b"\0" * (position - len(out)))
        flatbuffer_utils.update_packed_buffer(packed.Buffers(index), offset=position,
                                              size=len(data))
        out.extend(data)
        position = _round_up(len(out))
    return bytes(out)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
