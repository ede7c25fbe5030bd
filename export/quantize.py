"""Quantisation recipes: the int8 graphs of an export, built with ai-edge-quantizer.

Two products (see docs/quantization.md for the measurements behind them):

- role ``int8``: the CPU graph. int8 weights (per-channel); activations where
  int8 keeps fidelity, float elsewhere. In the per-bucket files each FULLY_CONNECTED's
  channel scales are moved into a MUL after it (``hybrid_fc.py``): tflite-runtime 2.14,
  the boards' runtime, computes per-channel hybrid FULLY_CONNECTED ops as zeros.
- role ``edgetpu``: the fully 8-bit graphs the Edge TPU needs: int8 weights AND
  activations with per-tensor scales, int8 inputs and output; built per layer by
  ``export/segments/`` with this module's FULL_INT8 approach.

Each bucket gets its own file: the plain Interpreter's XNNPACK packs the weights of
every subgraph of a file, so a multi-signature int8 file would cost one packed copy
per bucket in RAM; separate files are opened (and packed) only when used. With
LiteRT's CompiledModel and XNNPACK's weight cache the buckets' shared weights are
packed once, so the export also writes every bucket into one file (role
``int8-shared``), which the Embedder prefers on that path.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np

from gemma_edge.atomic_files import atomic_write_bytes
from gemma_edge.errors import QuantizationError

log = logging.getLogger("gemma_edge.export")


class Approach(str, enum.Enum):
    """How a graph is quantised (the value is what the manifest and CLI say)."""

    DYNAMIC_INT8 = "dynamic-int8"    # int8 weights, activations quantised at run time
    FULL_INT8 = "full-int8"          # every op a8w8, int8 I/O: what the Edge TPU runs


@dataclass
class QuantConfig:
    approach: Approach
    calibration_per_bucket: int = 24


# (ai-edge-quantizer's Quantizer, float graph, signature, samples) -> {tensor: {min, max}}:
# how a calibrated graph's activation ranges are measured. The export uses
# ``moving_average_ranges``; research/ranges.py has the statistics it was compared with.
RangeFn = Callable[[Any, bytes, str, Sequence[Dict[str, np.ndarray]]], Dict[str, Any]]


CPU_INT8 = QuantConfig(Approach.DYNAMIC_INT8)


def _recipe(qt: Any, approach: Approach) -> None:
    from ai_edge_quantizer import recipe

    if approach is Approach.DYNAMIC_INT8:
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    elif approach is Approach.FULL_INT8:
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
    else:  # pragma: no cover - enum is closed
        raise QuantizationError(f"unknown approach {approach}")


def quantize_graph(float_model: bytes, signature: str, config: QuantConfig,
                   calibration: Sequence[dict[str, np.ndarray]],
                   ranges: Optional[RangeFn] = None) -> bytes:
    """Quantise one single-signature float graph; returns the flatbuffer bytes.

    ``ranges`` measures the activation ranges of a calibrated approach (default:
    ``moving_average_ranges``)."""
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(bytearray(float_model))
    _recipe(qt, config.approach)
    sink = io.StringIO()
    try:
        # ai-edge-quantizer prints and draws progress bars per call: an export quantises
        # hundreds of graphs in worker processes, whose bars would cover the export's own
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            result = None
            if qt.need_calibration:
                if not calibration:
                    raise QuantizationError(f"{config.approach.value} needs calibration data")
                result = (ranges or moving_average_ranges)(qt, float_model, signature,
                                                           calibration)
                if config.approach is Approach.FULL_INT8:
                    unify_ranges(result, row_block_groups(float_model))
            quantized = qt.quantize(result, enable_progress_report=False).quantized_model
    except QuantizationError:
        raise
    except Exception as exc:  # noqa: BLE001 - ai-edge-quantizer raises many types
        raise QuantizationError(f"ai-edge-quantizer failed for {signature} "
                                f"({config.approach.value}): {type(exc).__name__}: {exc}") from exc
    return bytes(quantized)


def moving_average_ranges(qt: Any, float_model: bytes, signature: str,
                          samples: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The export's activation ranges: ai-edge-quantizer's min/max, folded over the
    samples by its moving average (``min_max_calibration``)."""
    return min_max_calibration(qt, signature, samples, os.cpu_count() or 1, float_model)


def min_max_calibration(qt: Any, signature: str, samples: Sequence[dict[str, np.ndarray]],
                        threads: int, float_model: bytes) -> dict[str, Any]:
    """ai-edge-quantizer's min/max calibration (moving average over the samples) in its
    profiler-based mode: the interpreter's C++ side reduces every tensor to its min and
    max while it runs, instead of Python copying each intermediate tensor out and reducing
    it in numpy. Same ranges (relative difference < 2e-6 on the real model's segments:
    float32 rounding); a 256-token attention segment calibrates in 1.0 s instead of 9.8 s
    for 8 samples (docs/quantization.md)."""
    from ai_edge_quantizer.calibrator import CalibrationMode

    result = qt.calibrate({signature: list(samples)}, num_threads=threads,
                          mode=CalibrationMode.CALIBRATION_PROFILER_BASED)
    # The default mode keeps each min/max with the tensor's rank ([1, 1, 1, 1] for a 4-D
    # tensor), the profiler mode gives [1]; ai-edge-quantizer's quantisation of a constant
    # with an op's output scale (MAXIMUM, ...) needs the default's shapes.
    ranks = _tensor_ranks(float_model)
    for name, qsv in result.items():
        if name in ranks:
            keep = (1,) * ranks[name]
            result[name] = dict(qsv, **{k: np.asarray(qsv[k]).reshape(keep)
                                        for k in ("min", "max") if k in qsv})
    return result


def _tensor_ranks(model: bytes) -> dict[str, int]:
    return {tensor.Name().decode(): tensor.ShapeLength() for _, tensor in model_tensors(model)}


def model_tensors(model: bytes) -> Iterator[tuple[Any, Any]]:
    """(root, tensor) for every tensor of every subgraph: LiteRT's flatbuffer accessors,
    nothing copied (the object API would unpack every weight)."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    for s in range(root.SubgraphsLength()):
        sub = root.Subgraphs(s)
        for t in range(sub.TensorsLength()):
            yield root, sub.Tensors(t)


def row_block_groups(model: bytes) -> list[list[str]]:
    """Names of the MUL outputs that are row blocks of one product (see below).

    The Edge TPU graphs compute attention products as MUL + SUM over blocks of query
    rows, concatenated (``coral_ops.row_blocks``: the compiler needs small activations).
    Each block's MUL gets its own calibrated range, but the blocks are one tensor cut by
    position: a block whose positions held mostly padding during calibration gets a
    narrower range and clips the real tokens a packed bucket puts there. Pattern:
    CONCATENATION <- SUM <- MUL, one group per CONCATENATION.
    """
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    groups = []
    for sub in tree.subgraphs or []:
        kind = [codes.get(max(tree.operatorCodes[op.opcodeIndex].builtinCode,
                              tree.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode))
                for op in sub.operators]
        producer = {int(t): i for i, op in enumerate(sub.operators) for t in op.outputs}

        for i, op in enumerate(sub.operators):
            if kind[i] != "CONCATENATION":
                continue
            group = []
            for t in op.inputs:
                s = producer.get(int(t))
                if s is None or kind[s] != "SUM":
                    break
                m = producer.get(int(sub.operators[s].inputs[0]))
                if m is None or kind[m] != "MUL":
                    break
                raw = sub.tensors[int(sub.operators[m].outputs[0])].name
                group.append(raw.decode() if isinstance(raw, bytes) else str(raw))
            else:
                if len(group) > 1:
                    groups.append(group)
    return groups


def unify_ranges(calibration: dict[str, Any], groups: Sequence[Sequence[str]]) -> int:
    """Give every tensor of a group the union of the group's ranges; tensors changed."""
    changed = 0
    for group in groups:
        present = [n for n in group if n in calibration]
        if len(present) < 2:
            continue
        low = np.min(np.stack([np.asarray(calibration[n]["min"]) for n in present]), axis=0)
        high = np.max(np.stack([np.asarray(calibration[n]["max"]) for n in present]), axis=0)
        for n in present:
            calibration[n] = dict(calibration[n], min=low, max=high)
        changed += len(present)
    return changed


def tensor_dtype_census(model: bytes) -> dict[str, int]:
    """Count tensors by dtype name across the graph (checks that 'full int8' is full)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    census: dict[str, int] = {}
    for sub in tree.subgraphs or []:
        for tensor in sub.tensors or []:
            name = names.get(tensor.type, str(tensor.type))
            census[name] = census.get(name, 0) + 1
    return census


def check_fully_int8(model: bytes) -> dict[str, int]:
    """Raise unless every tensor is 8-bit (int32 allowed for biases); returns the census."""
    census = tensor_dtype_census(model)
    bad = {k: v for k, v in census.items() if k not in ("INT8", "INT32")}
    if bad:
        raise QuantizationError(f"graph is not fully int8: {census}")
    return census


def build_cpu_int8(core: Any, art_dir: Path, buckets: Sequence[int], slots: int,
                   mask_penalty: float, config: QuantConfig = CPU_INT8,
                   progress: Optional[Any] = None,
                   shared_from: Optional[Path] = None) -> list[dict[str, Any]]:
    """Role "int8" graphs, one file per bucket; with ``shared_from`` (the multi-signature
    float file) also role "int8-shared" (below), and the per-bucket files are cut out of
    it (``signatures.extract_signature``: the same weights and ops, no more conversions);
    without it (or for calibrated approaches) each bucket is converted on its own.

    The per-bucket files are the ones the plain Interpreter runs, so tflite-runtime's
    (the boards'): their hybrid FULLY_CONNECTED ops get per-tensor weights and a MUL by
    the channel scales (``hybrid_fc.channel_scales_to_mul``; tflite-runtime 2.14 computes
    the per-channel form as zeros). The one-file graph keeps ai-edge-quantizer's
    per-channel form: only ai-edge-litert's CompiledModel reads it, which computes both
    forms bit for bit alike, and there the extra MULs would only cost time (within the
    noise, at most a few per cent, on the per-bucket files: docs/board-check.md)."""
    from .calibration import calibration_set
    from .convert import convert_buckets, graph_entry, signature_name
    from .encoder import BucketEncoder
    from .hybrid_fc import channel_scales_to_mul
    from .signatures import extract_signature

    calibration: dict[int, list[dict[str, np.ndarray]]] = {}
    if config.approach is not Approach.DYNAMIC_INT8:
        calibration = calibration_set(art_dir, buckets, config.calibration_per_bucket)
    shared: Optional[bytes] = None
    shared_entry: list[dict[str, Any]] = []
    if shared_from is not None and config.approach is Approach.DYNAMIC_INT8:
        if progress:
            progress("int8 CPU graph, all buckets in one file: quantising")
        shared = quantize_graph(shared_from.read_bytes(), f"encode_{buckets[0]}", config, [])
        atomic_write_bytes(art_dir / SHARED_INT8, shared)
        shared_entry.append(graph_entry(SHARED_INT8, "int8-shared", buckets, slots,
                                        mask_penalty, approach=config.approach.value,
                                        census=tensor_dtype_census(shared)))
    entries = []
    for seq_len in buckets:
        if shared is not None:
            if progress:
                progress(f"int8 CPU graph, bucket {seq_len}: cut out of the one-file graph")
            quantized = extract_signature(shared, signature_name(seq_len))
        else:
            if progress:
                progress(f"int8 CPU graph, bucket {seq_len}: converting + quantising")
            model = convert_buckets({seq_len: BucketEncoder(core, seq_len, mask_penalty).eval()},
                                    core.spec.hidden_size, slots)
            quantized = quantize_graph(model.model_content(), f"encode_{seq_len}", config,
                                       calibration.get(seq_len, []))
        quantized = channel_scales_to_mul(quantized)
        name = f"encoder_int8_{seq_len}.tflite"
        atomic_write_bytes(art_dir / name, quantized)
        entries.append(graph_entry(name, "int8", [seq_len], slots, mask_penalty,
                                   approach=config.approach.value,
                                   census=tensor_dtype_census(quantized)))
    return entries + shared_entry


# The float export is one multi-signature file whose buckets share every weight buffer;
# quantised as a whole it stays so (132 MB for the seven default buckets). LiteRT's
# CompiledModel with XNNPACK's weight cache then packs those weights once for all buckets
# (one 108 MB cache file): every bucket open costs ~100 MB less than one file per bucket. The plain
# Interpreter (no cache: tflite-runtime on boards) packs every signature of a file at
# once, so it keeps the per-bucket files (README, design notes: both figures).
SHARED_INT8 = "encoder_int8_all.tflite"
