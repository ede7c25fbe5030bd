"""Run edgetpu_compiler, check what it wrote, and judge the mapping by policy.

The compiler's exit code is not enough: it can exit 0 having mapped nothing,
leave a stub, or split the graph so that most of it runs on the CPU.  So the
outputs are checked (size, the ``edgetpu-custom-op`` inside), the console and
``*_edgetpu.log`` are parsed into a JSON report, the real mapping is compared
with the pre-flight prediction, and a policy decides.  Outputs are written to
a temp folder inside ``out_dir`` and renamed into place only on success.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gemma_edge.atomic_files import atomic_write_json
from gemma_edge.errors import CompilationError, CompilerNotFoundError, InputError

from .logparse import CompileLog, parse_compiler_output, parse_operation_log
from .tflite_reader import EDGETPU_CUSTOM_OP

COMPILER = "edgetpu_compiler"
COMPILER_ENV = "GEMMA_EDGE_EDGETPU_COMPILER"  # full path, when it is not on PATH
MIN_COMPILED_BYTES = 4096  # a compiled encoder is megabytes; ~1 KB means a stub
REPORT_FORMAT = "gemma-edge/edgetpu-compile-report/1"
CONSOLE_KEEP = 200_000  # characters of compiler output kept in the report
INSTALL_HINT = ("edgetpu_compiler runs only on x86-64 Debian/Ubuntu. Install it there with "
                "scripts/install-edgetpu-compiler.sh (adds Coral's apt source), or compile in "
                "Docker on any OS (Mac and ARM included): `make compile-docker` or "
                "scripts/compile-docker.sh ARTIFACTS_DIR")


@dataclass
class Policy:
    """When a successful compile still counts as a failure."""

    max_cpu_ops: Optional[int] = None  # ops left on the CPU, summed over segments
    require_single_subgraph: bool = True  # one Edge TPU subgraph per output (not with -n)
    require_mapped: bool = True  # at least one op on the Edge TPU


@dataclass
class CompiledModel:
    source: Path
    outputs: list[Path]  # compiled .tflite files, segments in pipeline order
    logs: list[Path] = field(default_factory=list)


@dataclass
class CompileResult:
    models: list[CompiledModel]
    report: dict[str, Any]
    report_path: Path


def find_compiler() -> str:
    """Absolute path of edgetpu_compiler, or CompilerNotFoundError saying how to get it.

    Absolute because the compiler starts inside its staging folder: a relative override or
    a relative PATH entry would otherwise be looked up from there.
    """
    override = os.environ.get(COMPILER_ENV)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return os.path.abspath(override)
        raise CompilerNotFoundError(f"{COMPILER_ENV}={override}: not an executable file. "
                                    f"{INSTALL_HINT}")
    found = shutil.which(COMPILER)
    if not found:
        raise CompilerNotFoundError(f"{COMPILER} not found on PATH. {INSTALL_HINT}")
    return os.path.abspath(found)


def compiled_names(model: Path, segments: Optional[int]) -> list[str]:
    """The file names the compiler writes for ``model`` ([CMP] input_filename_edgetpu.tflite;
    with -n N: input_filename_segment_i_of_N_edgetpu.tflite)."""
    stem = Path(model).stem
    if not segments:
        return [f"{stem}_edgetpu.tflite"]
    return [f"{stem}_segment_{i}_of_{segments}_edgetpu.tflite" for i in range(segments)]


def compile_model(model_path: Path, out_dir: Path, segments: Optional[int] = None,
                  min_runtime: Optional[int] = None, timeout: float = 600.0,
                  extra_models: Optional[Sequence[Path]] = None, *,
                  policy: Optional[Policy] = None, search_delegate: bool = False,
                  multiple_subgraphs: bool = False, preflight: bool = True) -> CompileResult:
    """Compile ``model_path`` (co-compiled with ``extra_models``) into ``out_dir``.

    ``segments`` pipelines the model over that many Edge TPUs (-n); ``min_runtime``
    is the oldest libedgetpu runtime the output must load on (-m); ``timeout``
    bounds the compiler (--timeout_sec) and this call.  Raises
    CompilerNotFoundError, InputError, CompilationError.
    """
    models = [Path(model_path)] + [Path(m) for m in (extra_models or [])]
    _validate(models, segments, min_runtime, timeout)
    policy = policy or Policy()
    compiler = find_compiler()
    predictions = _predict(models, min_runtime, multiple_subgraphs) if preflight else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # absolute: the compiler runs with the staging folder as its working directory, where
    # a relative --out_dir (`gemma-edge compile build/artifacts`) would not resolve
    staging = Path(tempfile.mkdtemp(prefix=".edgetpu-compile-", dir=out_dir.resolve()))
    try:
        cmd = [compiler, "--show_operations", "--out_dir", str(staging),
               "--timeout_sec", str(int(math.ceil(timeout)))]
        if min_runtime is not None:
            cmd += ["--min_runtime_version", str(min_runtime)]
        if segments:
            cmd += ["--num_segments", str(segments)]
        if search_delegate:
            cmd.append("--search_delegate")
        if multiple_subgraphs:
            cmd.append("--enable_multiple_subgraphs")
        cmd += [str(m.resolve()) for m in models]
        started = time.monotonic()
        returncode, console = _run(cmd, staging, timeout * max(1, segments or 1), models[0])
        seconds = round(time.monotonic() - started, 2)
        parsed = parse_compiler_output(console)
        from .compile_report import build_report

        report = build_report(models, staging, cmd, returncode, seconds, console[-CONSOLE_KEEP:],
                              parsed, predictions, segments, policy,
                              options={"segments": segments, "min_runtime": min_runtime,
                                       "timeout_s": timeout, "search_delegate": search_delegate,
                                       "multiple_subgraphs": multiple_subgraphs})
        failed_path = out_dir / f"{models[0].stem}_edgetpu.failed.json"
        problem = _failure(returncode, parsed, staging, models, segments, predictions)
        problem = problem or "; ".join(report["policy"]["violations"])
        if problem:
            report["error"] = problem
            atomic_write_json(failed_path, report)
            raise CompilationError(f"{problem} (report: {failed_path})")
        compiled = _install(staging, out_dir, models, segments)
        report_path = out_dir / f"{models[0].stem}_edgetpu.report.json"
        atomic_write_json(report_path, report)
        with contextlib.suppress(FileNotFoundError):
            failed_path.unlink()
        return CompileResult(models=compiled, report=report, report_path=report_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _validate(models: list[Path], segments: Optional[int], min_runtime: Optional[int],
              timeout: float) -> None:
    for m in models:
        if not m.is_file():
            raise InputError(f"{m}: no such file")
        if m.suffix != ".tflite":
            raise InputError(f"{m}: expected a .tflite model")
        if m.stem.endswith("_edgetpu"):
            raise InputError(f"{m}: already compiled for the Edge TPU; pass the uncompiled "
                             "int8 model")
    stems = [m.stem for m in models]
    if len(set(stems)) != len(stems):
        raise InputError(f"co-compiled models need distinct file names, got {stems}: their "
                         "outputs would overwrite each other")
    if segments is not None and segments < 2:
        raise InputError(f"--segments {segments}: segmenting needs 2 or more Edge TPUs")
    if segments and len(models) > 1:
        raise InputError("the compiler segments one model at a time; do not combine "
                         "--segments with co-compilation")
    if min_runtime is not None and not 10 <= min_runtime <= 14:
        raise InputError(f"--min-runtime {min_runtime}: edgetpu_compiler 16 targets Edge TPU "
                         "runtime 10 to 14")
    if not timeout > 0:
        raise InputError(f"--timeout {timeout}: must be a positive number of seconds")


def _predict(models: list[Path], min_runtime: Optional[int],
             multiple: bool) -> dict[str, Any]:
    """Pre-flight reports by model path; {} entries when ai-edge-litert is missing."""
    try:
        from .mapper import analyze
        from .rules import DEFAULT_MIN_RUNTIME
    except ImportError:  # pragma: no cover - mapper needs only numpy + ai-edge-litert
        return {}
    out = {}
    for m in models:
        try:
            report = analyze(m, min_runtime or DEFAULT_MIN_RUNTIME, multiple)
        except InputError as exc:
            if "ai-edge-litert" in str(exc):
                return {}
            raise
        if any(w.startswith("already compiled") for w in report.warnings):
            raise InputError(f"{m}: already contains {EDGETPU_CUSTOM_OP}; pass the uncompiled "
                             "int8 model")
        out[str(m)] = report
    return out


def _run(cmd: list[str], cwd: Path, timeout: float, model: Path) -> tuple[int, str]:
    """Run ``cmd`` (an argument list, no shell) in its own process group; kill it all on
    timeout, since the compiler forks a child that does the work."""
    grace = min(30.0, timeout)
    try:
        proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        raise CompilerNotFoundError(f"{cmd[0]}: cannot run it ({exc}). {INSTALL_HINT}") from exc
    try:
        out, _ = proc.communicate(timeout=timeout + grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise CompilationError(f"{model}: edgetpu_compiler still running after "
                               f"{timeout + grace:.0f} s, killed. Large encoders can take "
                               "minutes: raise --timeout, or split with --segments") from None
    return proc.returncode, out.decode("utf-8", "replace")


_HINTS = {
    "not_quantized": "the graph computes in float: compile the full-int8 graph (manifest role "
                     "'edgetpu'), not the float or weights-only int8 one",
    "unknown_opcode": "an op or op version is newer than compiler 16 knows; `gemma-edge check` "
                      "lists it; re-export with older op versions or replace the op",
    "output_not_writable": "the compiler could not write into its output folder (missing, "
                           "read-only or full disk): check the folder and its free space",
    "internal_error": "the compiler crashed on this graph; try a smaller bucket or --segments",
    "unresolved_custom_op": "the graph has a custom op the compiler's TFLite cannot load",
    "crashed": "the compiler process crashed; try a smaller bucket or --segments",
    "timed_out": "raise --timeout",
}


def _failure(returncode: int, parsed: CompileLog, staging: Path, models: list[Path],
             segments: Optional[int], predictions: dict[str, Any]) -> str:
    """Why this run failed ('' if it did not): exit code, console, then the files."""
    if returncode != 0 or parsed.failure:
        kind = parsed.failure or "failed"
        detail = parsed.failure_detail or f"exit status {returncode}"
        hint = _HINTS.get(kind, "see the compiler output in the report")
        predicted = [f for p in predictions.values() for f in p.fatal]
        extra = f"; pre-flight predicted: {predicted[0]}" if predicted else ""
        return (f"{models[0]}: edgetpu_compiler failed (exit {returncode}, {kind}): {detail}. "
                f"{hint}{extra}")
    for m in models:
        for name in compiled_names(m, segments):
            path = staging / name
            if not path.is_file():
                return f"{m}: edgetpu_compiler exited 0 but wrote no {name}"
            size = path.stat().st_size
            if size < MIN_COMPILED_BYTES:
                return (f"{m}: {name} is only {size} bytes, a stub rather than a compiled "
                        "model; the compiler mapped nothing or was interrupted")
            if not _contains(path, EDGETPU_CUSTOM_OP.encode()):
                return (f"{m}: {name} has no {EDGETPU_CUSTOM_OP}; nothing runs on the Edge "
                        "TPU (see the operation table in the report)")
    return ""


def _contains(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    tail = b""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def operation_log_rows(staging: Path, output_name: str) -> Optional[list[Any]]:
    """Rows of ``*_edgetpu.log`` for one output, or None when the compiler wrote none."""
    log = staging / (output_name[: -len(".tflite")] + ".log")
    if not log.is_file():
        return None
    return parse_operation_log(log.read_text(encoding="utf-8", errors="replace")).rows


def _install(staging: Path, out_dir: Path, models: list[Path],
             segments: Optional[int]) -> list[CompiledModel]:
    """Rename outputs from the staging folder into ``out_dir`` (same file system)."""
    compiled = []
    for m in models:
        item = CompiledModel(source=m, outputs=[])
        for name in compiled_names(m, segments):
            os.replace(staging / name, out_dir / name)
            item.outputs.append(out_dir / name)
            log = name[: -len(".tflite")] + ".log"
            if (staging / log).is_file():
                os.replace(staging / log, out_dir / log)
                item.logs.append(out_dir / log)
        compiled.append(item)
    return compiled
