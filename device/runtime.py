"""Find a TFLite runtime and run one graph signature with quantised I/O handled.

Runtimes are imported lazily and in order of preference, so this module imports
anywhere (tests, a laptop without any runtime) and the failure is explained:

- ``ai_edge_litert`` (LiteRT, pip ``ai-edge-litert``): laptops, x86/ARM Linux;
- ``tflite_runtime`` (pip ``tflite-runtime`` or Coral's build): Coral Dev Board, Pi.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from gemma_edge.errors import ArtifactError, RuntimeMissingError

log = logging.getLogger("gemma_edge.device")


def interpreter_api() -> tuple[Any, Callable[..., Any], str]:
    """(Interpreter class, load_delegate function, runtime name) of the first runtime found."""
    errors = []
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "ai-edge-litert"
    except ImportError as exc:
        errors.append(f"ai_edge_litert: {exc}")
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "tflite-runtime"
    except ImportError as exc:
        errors.append(f"tflite_runtime: {exc}")
    raise RuntimeMissingError(
        "no TFLite runtime found (" + "; ".join(errors) + "). Install one: "
        "`pip install ai-edge-litert` (laptop, x86/ARM Linux) or `pip install tflite-runtime` "
        "(Raspberry Pi, Coral Dev Board)")


def first_line(exc: BaseException) -> str:
    """The first line of a runtime's error: LiteRT appends multi-line native traces, and a
    gemma-edge error is one line."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


MAX_DEFAULT_THREADS = 4


def default_threads() -> int:
    """Interpreter threads when the caller gives none: the cores this process may use, at most 4.

    Why: the TFLite Python interpreters run ONE thread when ``num_threads`` is None,
    which halves int8 throughput on a 2-core machine. Beyond 4 threads the matmuls of
    a 300M-parameter encoder gain little and other work on the board loses cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores))


_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def release_file_pages(path: Path) -> int:
    """Drop this process's resident pages of a memory-mapped graph file; bytes released.

    Why: the interpreter maps the .tflite file, XNNPACK reads the weights once to
    pack them into its own buffers, and the file's pages then stay resident (~110 MB
    for an int8 graph) although no kernel reads them again. MADV_DONTNEED on a
    read-only file mapping only unmaps the pages: an op that still reads a constant
    faults it back in from the page cache, so results cannot change (writable mappings
    are left alone). Linux only (reads /proc/self/maps); elsewhere a no-op. No library
    offers this.
    """
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    target = os.path.realpath(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return 0
    released = 0
    for line in lines:
        parts = line.split(None, 5)
        # read-only mappings only: on a writable private one DONTNEED would drop changes
        if len(parts) == 6 and parts[5].strip() == target and parts[1][:2] == "r-":
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if madvise(start, end - start, _MADV_DONTNEED) == 0:
                released += end - start
    return released


def quantize_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """float -> the input tensor's int8/uint8 using its (scale, zero_point); float tensors
    pass. (Graph I/O at run time, not the export's quantisation recipes, export/quantize.py.)"""
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_output(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An output tensor's int8/uint8 values -> float32 (its scale, zero_point); float passes."""
    if not np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32, copy=False)
    scale, zero = detail["quantization"]
    return (x.astype(np.float32) - zero) * np.float32(scale)


INPUT_ROLES = ("embeddings", "mask", "pool")


def match_inputs(shapes: dict[str, Sequence[int]], seq_len: int, hidden: int,
                 slots: int) -> list[str]:
    """Input names in the order (embeddings, mask, pool), matched by name, then by shape.

    By shape too because edgetpu_compiler drops signature names and renames tensors.
    """
    want = {"embeddings": (1, seq_len, hidden), "mask": (1, seq_len, seq_len),
            "pool": (1, slots, seq_len)}
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    found: dict[str, str] = {}
    for name, shape in shapes.items():  # by name first (float and CPU int8 graphs keep them)
        role = next((r for r in INPUT_ROLES if name.split(":")[0].endswith(r)), None)
        if role and shape == want[role]:
            found[role] = name
    for name, shape in shapes.items():  # then by shape
        if name in found.values():
            continue
        role = next((r for r in INPUT_ROLES if r not in found and shape == want[r]), None)
        if role:
            found[role] = name
    missing = [r for r in INPUT_ROLES if r not in found]
    if missing:
        raise ArtifactError(f"graph inputs {sorted(shapes.values())} do not match bucket "
                            f"{seq_len} (missing {missing}); the artifacts are "
                            "inconsistent, re-export")
    return [found[r] for r in INPUT_ROLES]


class GraphRunner:
    """One encoder graph signature: ``run(embeddings, mask, pool) -> [S, D]`` float32.

    Inputs are matched by ``match_inputs`` (name, then shape).
    """

    def __init__(self, interpreter: Any, signature: Optional[str], seq_len: int,
                 hidden: int, slots: int, release_after_first_run: Optional[Path] = None):
        self.interpreter = interpreter
        # XNNPACK packs the weights at the first invoke; after it the file's pages go.
        self._release_path = release_after_first_run
        self.seq_len, self.hidden, self.slots = seq_len, hidden, slots
        self._runner = None
        if signature and signature in (interpreter.get_signature_list() or {}):
            self._runner = interpreter.get_signature_runner(signature)
            inputs = self._runner.get_input_details()
            outputs = self._runner.get_output_details()
            self._in_names = self._match(list(inputs.items()))
            self._in_details = [inputs[n] for n in self._in_names]
            self._out_detail = next(iter(outputs.values()))
            self._out_name = next(iter(outputs))
        else:
            interpreter.allocate_tensors()
            details = [(d["name"], d) for d in interpreter.get_input_details()]
            names = self._match(details)
            by_name = dict(details)
            self._in_details = [by_name[n] for n in names]
            outs = interpreter.get_output_details()
            if len(outs) != 1:
                raise ArtifactError(f"graph has {len(outs)} outputs, expected 1")
            self._out_detail = outs[0]

    def _match(self, details: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        return match_inputs({name: d["shape"] for name, d in details}, self.seq_len,
                            self.hidden, self.slots)

    @property
    def input_details(self) -> list[dict[str, Any]]:
        return self._in_details

    def run(self, embeddings: np.ndarray, mask: np.ndarray, pool: np.ndarray) -> np.ndarray:
        arrays = [quantize_input(a, d) for a, d in zip((embeddings, mask, pool), self._in_details)]
        if self._runner is not None:
            out = self._runner(**dict(zip(self._in_names, arrays)))[self._out_name]
        else:
            for array, detail in zip(arrays, self._in_details):
                self.interpreter.set_tensor(detail["index"], array)
            self.interpreter.invoke()
            out = self.interpreter.get_tensor(self._out_detail["index"])
        if self._release_path is not None:
            release_file_pages(self._release_path)
            self._release_path = None
        return dequantize_output(out, self._out_detail).reshape(self.slots, -1)
