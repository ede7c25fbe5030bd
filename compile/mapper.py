"""Pre-flight: predict, op by op, what edgetpu_compiler 16 will put on the Edge TPU.

Runs without the compiler (which exists only for x86-64 Debian), so the export
can be checked anywhere and the compile stage can compare the real mapping
with the prediction.  The rules are in ``rules.py``, the arithmetic in
``estimate.py``; this module applies the cut rule and builds the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import rules
from .estimate import Assumptions, LatencyEstimate, estimate_latency, op_macs, split_cache
from .rules import EIGHT_BIT
from .tflite_reader import EDGETPU_CUSTOM_OP, Graph, Model, read_model


@dataclass
class OpReport:
    index: int
    op: str
    version: int
    mapped: bool
    status: str  # the compiler's status string for this op
    reason: str  # why it is not mapped ("" when mapped)
    source: str  # the doc section or compiler message the reason comes from
    macs: int
    param_bytes: int  # constant operands (weights, biases) of this op
    inputs: list[str] = field(default_factory=list)  # "int8[1,64,768]"
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GraphReport:
    index: int
    name: str
    ops: list[OpReport]
    tpu_subgraphs: int
    cut: Optional[dict[str, Any]]  # {"index", "op", "reason"}: first op the compiler stops at
    param_bytes: int  # constants used by mapped ops
    cached_bytes: int
    streamed_bytes: int
    cpu_param_bytes: int  # constants used only by CPU ops
    io_bytes: int  # activations crossing between CPU and Edge TPU per inference
    estimates: list[LatencyEstimate]

    @property
    def tpu_ops(self) -> int:
        return sum(1 for o in self.ops if o.mapped)

    @property
    def total_macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def tpu_macs(self) -> int:
        return sum(o.macs for o in self.ops if o.mapped)

    def status_counts(self) -> list[tuple[str, int, str]]:
        """(op, count, status) rows, as the compiler's operation table groups them."""
        counts = Counter((o.op, o.status) for o in self.ops)
        return [(op, n, status) for (op, status), n in counts.items()]

    def to_json(self) -> dict[str, Any]:
        ops = len(self.ops)
        return {
            "index": self.index, "name": self.name, "ops": ops, "tpu_ops": self.tpu_ops,
            "cpu_ops": ops - self.tpu_ops, "op_share": _share(self.tpu_ops, ops),
            "total_macs": self.total_macs, "tpu_macs": self.tpu_macs,
            "mac_share": _share(self.tpu_macs, self.total_macs),
            "tpu_subgraphs": self.tpu_subgraphs, "cut": self.cut,
            "param_bytes": self.param_bytes, "cached_bytes": self.cached_bytes,
            "streamed_bytes": self.streamed_bytes, "cpu_param_bytes": self.cpu_param_bytes,
            "io_bytes": self.io_bytes,
            "status_counts": [{"op": o, "count": n, "status": s}
                              for o, n, s in self.status_counts()],
            "estimates": [e.to_json() for e in self.estimates],
            "operators": [o.to_json() for o in self.ops],
        }


@dataclass
class MapperReport:
    model: str
    size: int
    min_runtime: int
    multiple_subgraphs: bool
    compiles: bool  # False: the compiler will stop before mapping anything
    fatal: list[str]
    warnings: list[str]
    graphs: list[GraphReport]
    assumptions: Assumptions

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "bytes": self.size,
                "compiler_version": rules.COMPILER_VERSION, "min_runtime": self.min_runtime,
                "multiple_subgraphs": self.multiple_subgraphs, "compiles": self.compiles,
                "fatal": self.fatal, "warnings": self.warnings,
                "graphs": [g.to_json() for g in self.graphs],
                "assumptions": self.assumptions.to_json()}

    def format_table(self, target: Optional[str] = None, clock: Optional[str] = None) -> str:
        from .report_text import format_report

        return format_report(self, target, clock)


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _describe(g: Graph, indices: tuple[int, ...]) -> list[str]:
    return [f"{t.dtype}{list(t.shape)}" + (" const" if t.constant else "")
            for t in (g.tensor(i) for i in indices) if t is not None]


def analyze(path: Path, min_runtime: int = rules.DEFAULT_MIN_RUNTIME,
            multiple_subgraphs: bool = False,
            assumptions: Optional[Assumptions] = None) -> MapperReport:
    """Read ``path`` and predict the compiler's mapping (see ``analyze_model``)."""
    return analyze_model(read_model(path), min_runtime, multiple_subgraphs, assumptions)


def analyze_model(model: Model, min_runtime: int = rules.DEFAULT_MIN_RUNTIME,
                  multiple_subgraphs: bool = False,
                  assumptions: Optional[Assumptions] = None) -> MapperReport:
    """Predict the mapping of every subgraph of ``model``.

    ``multiple_subgraphs`` models ``edgetpu_compiler -a``: every run of mappable
    ops becomes its own Edge TPU subgraph instead of stopping at the first cut.
    """
    a = assumptions or Assumptions()
    fatal: list[str] = []
    warnings: list[str] = []
    for g in model.graphs:
        for op in g.operators:
            message = rules.unknown_to_compiler(op)
            if message and message not in fatal:
                fatal.append(message)
        if _float_only(g):
            fatal.append(f"Model not quantized: subgraph {g.index} has no operator whose "
                         "activations are all int8/uint8 (quantise the whole graph, not "
                         "only the weights)")
    if len(model.graphs) > 1:
        warnings.append(f"{len(model.graphs)} subgraphs (signatures {model.signatures}); each "
                        "is predicted on its own, but edgetpu_compiler expects one: give the "
                        "Edge TPU one graph per bucket")
    if model.compiled_for_edgetpu:
        warnings.append(f"already compiled: contains {EDGETPU_CUSTOM_OP}")
    graphs = [_analyze_graph(g, min_runtime, multiple_subgraphs, a) for g in model.graphs]
    return MapperReport(model=str(model.path), size=model.size, min_runtime=min_runtime,
                        multiple_subgraphs=multiple_subgraphs, compiles=not fatal, fatal=fatal,
                        warnings=warnings, graphs=graphs, assumptions=a)


def _float_only(g: Graph) -> bool:
    """[LOG] "Model not quantized" (google-coral/edgetpu#168, #238, #313): the compiler
    rejects graphs that compute in float.  Heuristic: no compute op is all 8-bit."""
    for op in g.operators:
        if op.op.startswith("CUSTOM:"):
            continue
        acts = [t for t in g.op_inputs(op) + g.op_outputs(op) if not t.constant]
        if acts and all(t.dtype in EIGHT_BIT for t in acts):
            return False
    return bool(g.operators) and not any(op.op.startswith("CUSTOM:") for op in g.operators)


def _analyze_graph(g: Graph, min_runtime: int, multiple: bool, a: Assumptions) -> GraphReport:
    reports: list[OpReport] = []
    cut: Optional[dict[str, Any]] = None
    seen_mapped = False
    for op in g.operators:
        consts = [t for t in g.op_inputs(op) if t.constant]
        if op.op == f"CUSTOM:{EDGETPU_CUSTOM_OP}":
            finding = None
        else:
            finding = rules.check_operator(op, g, min_runtime)
        report = OpReport(index=op.index, op=op.op, version=op.version, mapped=False,
                          status=rules.MAPPED, reason="", source="", macs=op_macs(op, g),
                          param_bytes=sum(t.nbytes for t in consts),
                          inputs=_describe(g, op.inputs), outputs=_describe(g, op.outputs))
        if finding is not None:
            report.status, report.reason, report.source = (finding.status, finding.reason,
                                                           finding.source)
            if seen_mapped and cut is None and not multiple:
                # [CUT] that operation and everything after it executes on the CPU.
                cut = {"index": op.index, "op": op.op, "reason": finding.reason}
        elif cut is not None:
            report.status = rules.AFTER_CUT
            report.reason = f"after the cut at op {cut['index']} ({cut['op']})"
            report.source = "coral.ai/docs/edgetpu/models-intro/#compiling [LOG]"
        else:
            report.mapped = seen_mapped = True
        reports.append(report)
    return _totals(g, reports, cut, a)


def _totals(g: Graph, ops: list[OpReport], cut: Optional[dict[str, Any]],
            a: Assumptions) -> GraphReport:
    mapped = {o.index for o in ops if o.mapped}
    runs = sum(1 for i, o in enumerate(ops) if o.mapped and (i == 0 or not ops[i - 1].mapped))
    tpu_buffers: dict[int, int] = {}
    cpu_buffers: dict[int, int] = {}
    producer: dict[int, int] = {}
    consumers: dict[int, set[int]] = {}
    for op in g.operators:
        for t in g.op_inputs(op):
            if t.constant:
                (tpu_buffers if op.index in mapped else cpu_buffers).setdefault(t.buffer, t.nbytes)
            else:
                consumers.setdefault(t.index, set()).add(op.index)
        for t in op.outputs:
            producer[t] = op.index
    cpu_only = {b: n for b, n in cpu_buffers.items() if b not in tpu_buffers}
    cached, streamed = split_cache(list(tpu_buffers.values()), a.param_cache_bytes)
    # Activations crossing the link: mapped-op inputs made on the CPU (or graph inputs),
    # mapped-op outputs read by the CPU (or graph outputs).
    crossing: set[int] = set()
    for op in g.operators:
        if op.index not in mapped:
            continue
        for t in g.op_inputs(op):
            if not t.constant and producer.get(t.index) not in mapped:
                crossing.add(t.index)
        for i in op.outputs:
            if i in g.outputs or any(c not in mapped for c in consumers.get(i, ())):
                crossing.add(i)
    io_bytes = sum(g.tensors[i].activation_bytes for i in crossing)
    tpu_macs = sum(o.macs for o in ops if o.mapped)
    cpu_macs = sum(o.macs for o in ops if not o.mapped)
    estimates = [estimate_latency(a, t.name, clock, tpu_macs, cpu_macs, cached, streamed,
                                  io_bytes, runs)
                 for t in a.targets for clock in ("std", "max")]
    return GraphReport(index=g.index, name=g.name, ops=ops, tpu_subgraphs=runs, cut=cut,
                       param_bytes=sum(tpu_buffers.values()), cached_bytes=cached,
                       streamed_bytes=streamed, cpu_param_bytes=sum(cpu_only.values()),
                       io_bytes=io_bytes, estimates=estimates)
