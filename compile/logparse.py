"""Parse what edgetpu_compiler prints (``-s``) and the ``*_edgetpu.log`` it writes.

The compiler has no machine-readable output; these are its documented text
formats (coral.ai/docs/edgetpu/compiler/) and the failure lines seen in
google-coral/edgetpu issues.  Unknown lines are kept, never fatal: a newer
compiler that words something differently still yields a report.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

MAPPED_STATUS = "Mapped to Edge TPU"
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE = re.compile(r"^\s*([0-9.]+)\s*(B|KiB|MiB|GiB)\s*$")
_ROW = re.compile(r"^(?P<op>\S+)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")
_SEGMENT = re.compile(r"_segment_(\d+)_of_(\d+)_edgetpu\.tflite$")
_SUMMARY = {  # "Key: value" lines of the -s summary -> field name
    "Input model": "input_model", "Input": "input_model", "Input size": "input_size",
    "Output model": "output_model", "Output": "output_model", "Output size": "output_size",
    "On-chip memory used for caching model parameters": "on_chip_used",
    "On-chip memory remaining for caching model parameters": "on_chip_remaining",
    "On-chip memory available for caching model parameters": "on_chip_remaining",
    "Off-chip memory used for streaming uncached model parameters": "off_chip_streamed",
    "Number of Edge TPU subgraphs": "edgetpu_subgraphs",
    "Total number of operations": "total_ops", "Operation log": "operation_log",
    "Number of operations that will run on Edge TPU": "tpu_ops",
    "Number of operations that will run on CPU": "cpu_ops",
}
_SIZES = {"input_size", "output_size", "on_chip_used", "on_chip_remaining", "off_chip_streamed"}
_INTS = {"edgetpu_subgraphs", "total_ops", "tpu_ops", "cpu_ops"}
# (kind, pattern) for failures; the first match names the failure.
_FAILURES = (
    ("not_quantized", re.compile(r"Model not quantized")),
    ("unknown_opcode", re.compile(r"Didn't find op for builtin opcode '([^']+)' version '(\d+)'")),
    # printed just before "Internal compiler error" when --out_dir is missing or read-only
    ("output_not_writable", re.compile(r"Error opening file for writing: ?(.+)")),
    ("internal_error", re.compile(r"Internal compiler error\. Aborting!")),
    ("unresolved_custom_op", re.compile(r"Encountered unresolved custom op: ?([^\s.]+)")),
    ("compilation_failed", re.compile(r"^Compilation failed: (.+)$", re.M)),
    ("invalid_model", re.compile(r"^Invalid model: (.+)$", re.M)),
    ("crashed", re.compile(r"Segmentation fault|core dumped|Aborted")),
    ("timed_out", re.compile(r"timed out|timeout period expired", re.I)),
    ("failed", re.compile(r"^Compilation failed!", re.M)),
)


def parse_size(text: str) -> Optional[int]:
    """'7.88MiB' -> 8262778 bytes; None for text that is not a compiler size."""
    m = _SIZE.match(text)
    return int(round(float(m.group(1)) * _UNITS[m.group(2)])) if m else None


@dataclass
class OpRow:
    op: str
    count: int
    status: str

    @property
    def mapped(self) -> bool:
        return self.status.startswith(MAPPED_STATUS)


@dataclass
class ModelSummary:
    """One compiled model (or one segment) in the compiler's -s summary."""

    input_model: str = ""
    output_model: str = ""
    input_size: Optional[int] = None
    output_size: Optional[int] = None
    on_chip_used: Optional[int] = None
    on_chip_remaining: Optional[int] = None
    off_chip_streamed: Optional[int] = None
    edgetpu_subgraphs: Optional[int] = None
    total_ops: Optional[int] = None
    tpu_ops: Optional[int] = None
    cpu_ops: Optional[int] = None
    operation_log: str = ""
    compile_ms: Optional[int] = None
    rows: list[OpRow] = field(default_factory=list)
    rows_complete: bool = True  # False: the console listed only part of the table
    all_mapped: bool = False  # no CPU ops were reported

    @property
    def segment(self) -> Optional[tuple[int, int]]:
        m = _SEGMENT.search(self.output_model)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def mapped_counts(self) -> dict[str, dict[str, int]]:
        """{op: {"tpu": n, "cpu": m}} from the operation table rows."""
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            slot = out.setdefault(r.op, {"tpu": 0, "cpu": 0})
            slot["tpu" if r.mapped else "cpu"] += r.count
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["segment"] = list(self.segment) if self.segment else None
        return data


@dataclass
class CompileLog:
    compiler_version: Optional[str] = None
    models: list[ModelSummary] = field(default_factory=list)
    succeeded: Optional[bool] = None  # "Compilation succeeded!" / "Compilation failed!"
    failure: Optional[str] = None  # kind from _FAILURES
    failure_detail: str = ""
    errors: list[str] = field(default_factory=list)  # "ERROR: ..." lines
    warnings: list[str] = field(default_factory=list)
    timeout_timer_s: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.succeeded is not False and bool(self.models)

    def to_json(self) -> dict[str, Any]:
        return {"compiler_version": self.compiler_version, "ok": self.ok,
                "succeeded": self.succeeded, "failure": self.failure,
                "failure_detail": self.failure_detail, "errors": self.errors,
                "warnings": self.warnings, "timeout_timer_s": self.timeout_timer_s,
                "models": [m.to_json() for m in self.models]}


def parse_compiler_output(text: str) -> CompileLog:
    """Parse the console output of ``edgetpu_compiler -s`` (any number of models)."""
    log = CompileLog()
    current: Optional[ModelSummary] = None
    in_table = False
    pending_ms: Optional[int] = None
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            continue
        m = re.match(r"Edge TPU Compiler version (\S+)", stripped)
        if m:
            log.compiler_version = m.group(1)
            continue
        m = re.match(r"Started a compilation timeout timer of (\d+) seconds", stripped)
        if m:
            log.timeout_timer_s = int(m.group(1))
            continue
        m = re.match(r"Models? compiled successfully in (\d+) ms", stripped)
        if m:
            pending_ms = int(m.group(1))
            continue
        if stripped.startswith("ERROR:"):
            log.errors.append(stripped[6:].strip())
            continue
        if stripped.startswith("Warning:"):
            log.warnings.append(stripped[8:].strip())
            continue
        if stripped.startswith("Compilation succeeded"):
            log.succeeded = True if log.succeeded is None else log.succeeded
            in_table = False
            continue
        if stripped.startswith("Compilation failed!"):
            log.succeeded = False
            in_table = False
            continue
        key, sep, value = stripped.partition(":")
        field_name = _SUMMARY.get(key.strip()) if sep else None
        if field_name:
            if field_name == "input_model" and (current is None or current.input_model):
                current = ModelSummary(compile_ms=pending_ms)
                log.models.append(current)
            if current is None:
                current = ModelSummary(compile_ms=pending_ms)
                log.models.append(current)
            _set(current, field_name, value.strip())
            in_table = False
            continue
        if re.match(r"Operator\s+Count\s+Status$", stripped):
            in_table = current is not None
            continue
        if current is not None and ("See the operation log file" in stripped
                                    or "All other operators were mapped" in stripped):
            current.rows_complete = False
            continue
        row = _ROW.match(stripped) if in_table else None
        if row and current is not None:
            current.rows.append(OpRow(row["op"], int(row["count"]), row["status"]))
    for summary in log.models:
        if summary.cpu_ops is not None:
            summary.all_mapped = summary.cpu_ops == 0
        else:
            summary.all_mapped = summary.rows_complete and all(r.mapped for r in summary.rows)
    _classify_failure(log, text)
    return log


def _set(summary: ModelSummary, name: str, value: str) -> None:
    if name in _SIZES:
        setattr(summary, name, parse_size(value))
    elif name in _INTS:
        m = re.match(r"\d+", value)
        setattr(summary, name, int(m.group(0)) if m else None)
    else:
        setattr(summary, name, value)


def _classify_failure(log: CompileLog, text: str) -> None:
    for kind, pattern in _FAILURES:
        m = pattern.search(text)
        if m:
            log.failure = kind
            log.failure_detail = m.group(0).strip()
            return


@dataclass
class OperationLog:
    """``*_edgetpu.log``: the full per-operator table of one compiled model."""

    compiler_version: Optional[str]
    input_model: str
    output_model: str
    rows: list[OpRow]

    def to_json(self) -> dict[str, Any]:
        return {"compiler_version": self.compiler_version, "input_model": self.input_model,
                "output_model": self.output_model,
                "rows": [{**asdict(r), "mapped": r.mapped} for r in self.rows]}


def parse_operation_log(text: str) -> OperationLog:
    """Parse the ``.log`` file the compiler writes next to each compiled model."""
    console = parse_compiler_output(text)
    first = console.models[0] if console.models else ModelSummary()
    rows = [r for m in console.models for r in m.rows]
    return OperationLog(console.compiler_version, first.input_model, first.output_model, rows)
