"""The fully int8 Edge TPU graphs: int8 weights AND activations, int8 inputs and output.

Recipe (see docs/quantization.md for the measurements):

1. rewrite the encoder into ``int8_encoder.Int8BucketEncoder`` (flattened residual
   stream, gains folded into weights, multiplicative finite mask, padding/empty-slot
   conditioning) from the same ``EncoderCore`` weights; it is checked equal to
   ``BucketEncoder`` in float before anything is quantised;
2. convert one bucket per file with litert-torch;
3. ai-edge-quantizer ``static_wi8_ai8`` (int8 per-channel weights, int8 per-tensor
   activations, int32 biases) calibrated on the project corpus only;
4. rewrite the graph boundary to int8 (``int8_boundary``): drop the entry QUANTIZE
   and exit DEQUANTIZE ops. ``modify_model_interface`` cannot be used: it rejects
   the offset-buffer files ai-edge-quantizer writes.

The result is asserted fully 8-bit (no FLOAT32 tensor) and loaded once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from gemma_edge.errors import QuantizationError
from gemma_edge.manifest import atomic_write_bytes

from .convert import convert_buckets, graph_entry, signature_name
from .encoder import BucketEncoder, EncoderCore
from .int8_encoder import DEFAULT_INT8_MASK_PENALTY, Int8BucketEncoder, build_int8_core
from .quantize import Approach, QuantConfig, quantize_graph, tensor_dtype_census

APPROACH = "full-int8"
FLOAT_EQUALITY = 0.99999  # min cosine of the rewrite to BucketEncoder in float


def int8_boundary(model: bytes) -> bytes:
    """int8 inputs and output: remove the boundary QUANTIZE / DEQUANTIZE ops.

    Reads with the schema object API (which resolves offset buffers), rewires graph
    inputs/outputs and signature maps to the int8 tensors, drops the tensors no op
    uses any more and re-serialises with the buffers inline (the int8 encoder is
    ~110 MB, far below the 2 GiB flatbuffer limit).
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    tree = fbu.read_model_from_bytearray(bytearray(model))
    codes = [fbu.get_builtin_code_from_operator_code(c) for c in tree.operatorCodes]
    quant, dequant = schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE
    for index, sub in enumerate(tree.subgraphs):
        readers: dict[int, int] = {}
        for op in sub.operators:
            for t in op.inputs:
                readers[t] = readers.get(t, 0) + 1
        remap: dict[int, int] = {}
        kept = []
        for op in sub.operators:
            code = codes[op.opcodeIndex]
            if code == quant and op.inputs[0] in sub.inputs:
                if readers[op.inputs[0]] != 1:
                    raise QuantizationError("a float graph input feeds more than one op")
                remap[op.inputs[0]] = op.outputs[0]
                continue
            if code == dequant and op.outputs[0] in sub.outputs:
                remap[op.outputs[0]] = op.inputs[0]
                continue
            kept.append(op)
        sub.operators = kept
        maps = [m for sig in tree.signatureDefs or [] if sig.subgraphIndex == index
                for m in list(sig.inputs or []) + list(sig.outputs or [])]
        used = {remap.get(t, t) for t in list(sub.inputs) + list(sub.outputs)}
        for op in kept:
            used.update(t for t in op.inputs if t >= 0)
            used.update(op.outputs)
            used.update(getattr(op, "intermediates", None) or [])
        order = sorted(used)
        new = {old: i for i, old in enumerate(order)}

        def renumber(ts: Any, new: dict[int, int] = new, remap: dict[int, int] = remap
                     ) -> list[int]:
            return [new[remap.get(t, t)] if t >= 0 else t for t in ts]

        sub.tensors = [sub.tensors[i] for i in order]
        for op in kept:
            op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
            if getattr(op, "intermediates", None) is not None and len(op.intermediates):
                op.intermediates = renumber(op.intermediates)
        sub.inputs, sub.outputs = renumber(sub.inputs), renumber(sub.outputs)
        for m in maps:
            m.tensorIndex = new[remap.get(m.tensorIndex, m.tensorIndex)]
    for buffer in tree.buffers:
        if buffer.data is not None and not isinstance(buffer.data, np.ndarray):
            buffer.data = np.frombuffer(bytes(buffer.data), np.uint8)
    return bytes(fbu.convert_object_to_bytearray(tree))


def check_fully_int8(model: bytes) -> dict[str, int]:
    """Raise unless every tensor is 8-bit (int32 allowed for biases)."""
    census = tensor_dtype_census(model)
    bad = {k: v for k, v in census.items() if k not in ("INT8", "INT32")}
    if bad:
        raise QuantizationError(f"graph is not fully int8: {census}")
    return census


@torch.no_grad()
def check_rewrite(core: EncoderCore, module: Int8BucketEncoder,
                  samples: Sequence[dict[str, np.ndarray]]) -> float:
    """Min cosine (over live pooling slots) of the rewrite to BucketEncoder in float."""
    reference = BucketEncoder(core, module.seq_len).eval()
    worst = 1.0
    for s in samples:
        args = [torch.from_numpy(s[k]) for k in ("embeddings", "mask", "pool")]
        a, b = reference(*args)[0], module(*args)[0]
        live = args[2][0].sum(-1) > 0
        cos = torch.nn.functional.cosine_similarity(a[live], b[live], dim=-1)
        worst = min(worst, float(cos.min()))
    if worst < FLOAT_EQUALITY:
        raise QuantizationError(f"int8 rewrite differs from the float encoder "
                                f"(cosine {worst:.6f} < {FLOAT_EQUALITY})")
    return worst


def quantize_static(float_model: bytes, signature: str,
                    calibration: Sequence[dict[str, np.ndarray]]) -> bytes:
    """ai-edge-quantizer static_wi8_ai8 (min/max calibration) -> flatbuffer bytes."""
    return quantize_graph(float_model, signature, QuantConfig(Approach.FULL_INT8), calibration)


def build_full_int8(core: EncoderCore, art_dir: Path, buckets: Sequence[int], out_dir: Path,
                    per_bucket_calibration: int = 16,
                    progress: Optional[Callable[[str], None]] = None,
                    mask_penalty: float = DEFAULT_INT8_MASK_PENALTY,
                    calibration: Optional[dict[int, list[dict[str, np.ndarray]]]] = None
                    ) -> list[dict[str, Any]]:
    """One fully int8 file per bucket (``encoder_edgetpu_<T>.tflite``); manifest entries.

    art_dir holds a float export (its manifest, tokenizer and table build the
    calibration inputs from calibration_data/corpus). ``calibration`` may be given
    directly ({bucket: [inputs]}) instead.
    """
    from ai_edge_litert.interpreter import Interpreter

    from .calibration import calibration_set

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if calibration is None:
        if progress:
            progress(f"building calibration inputs ({per_bucket_calibration} per bucket)")
        calibration = calibration_set(Path(art_dir), buckets, per_bucket_calibration)
    slots = int(next(iter(calibration.values()))[0]["pool"].shape[1])
    hidden = core.spec.hidden_size
    stats_samples = [s for t in buckets for s in calibration[t][:4]]
    if progress:
        progress("measuring the residual stream and folding the int8 rewrite")
    icore = build_int8_core(core, stats_samples)
    entries = []
    for t in buckets:
        module = Int8BucketEncoder(icore, t, mask_penalty).eval()
        worst = check_rewrite(core, module, calibration[t][:2])
        if progress:
            progress(f"bucket {t}: rewrite equal in float (cos {worst:.7f}); converting")
        float_model = convert_buckets({t: module}, hidden, slots)
        float_bytes = _exported_bytes(float_model)
        if progress:
            progress(f"bucket {t}: calibrating and quantising")
        quantized = int8_boundary(quantize_static(float_bytes, signature_name(t), calibration[t]))
        census = check_fully_int8(quantized)
        name = f"encoder_edgetpu_{t}.tflite"
        atomic_write_bytes(out_dir / name, quantized)
        Interpreter(model_path=str(out_dir / name)).allocate_tensors()  # loads and prepares
        entries.append(graph_entry(name, "edgetpu", [t], slots, mask_penalty,
                                   approach=APPROACH, census=census,
                                   calibration_per_bucket=len(calibration[t])))
    return entries


def _exported_bytes(model: Any) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.tflite"
        model.export(str(path))
        return path.read_bytes()
