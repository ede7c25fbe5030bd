"""The JSON report of one edgetpu_compiler run, and the prediction-vs-real comparison.

Schema (``format`` = "gemma-edge/edgetpu-compile-report/1"):

    created, command, returncode, seconds, compiler {path, version}, options {...},
    console {parsed console, see logparse.CompileLog.to_json}, console_text,
    models: [{input, outputs: [{path, bytes, segment, summary, rows_source}],
              tpu_ops, cpu_ops, edgetpu_subgraphs, operators: {op: {tpu, cpu}},
              prediction: {compiles, fatal, tpu_ops, cpu_ops, cut, tpu_subgraphs} | null,
              comparison: {agrees, operators: [{op, predicted_tpu, actual_tpu,
                                                predicted_cpu, actual_cpu}]} | null}],
    policy: {max_cpu_ops, require_single_subgraph, require_mapped, passed, violations}
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .logparse import CompileLog, ModelSummary

if TYPE_CHECKING:  # pragma: no cover
    from .compiler import Policy
    from .mapper import MapperReport


def build_report(models: list[Path], staging: Path, cmd: list[str], returncode: int,
                 seconds: float, console: str, parsed: CompileLog,
                 predictions: dict[str, MapperReport], segments: Optional[int],
                 policy: Policy, options: dict[str, Any]) -> dict[str, Any]:
    from .compiler import compiled_names, operation_log_rows

    entries = []
    for m in models:
        names = compiled_names(m, segments)
        outputs = []
        counts: dict[str, dict[str, int]] = {}
        subgraphs: list[int] = []
        for name in names:
            summary = _summary_for(parsed, name)
            log_rows = operation_log_rows(staging, name)
            if log_rows is not None and summary is not None:
                summary.rows, summary.rows_complete = log_rows, True
            path = staging / name
            outputs.append({"path": name, "bytes": path.stat().st_size if path.is_file() else None,
                            "segment": list(summary.segment) if summary and summary.segment
                            else None,
                            "summary": summary.to_json() if summary else None,
                            "rows_source": "operation log" if log_rows is not None else "console"})
            if summary is None:
                continue
            for op, c in summary.mapped_counts().items():
                slot = counts.setdefault(op, {"tpu": 0, "cpu": 0})
                slot["tpu"] += c["tpu"]
                slot["cpu"] += c["cpu"]
            if summary.edgetpu_subgraphs is not None:
                subgraphs.append(summary.edgetpu_subgraphs)
        summaries = [s for s in (_summary_for(parsed, n) for n in names) if s is not None]
        tpu, cpu = _op_totals(summaries, counts)
        prediction = predictions.get(str(m))
        entries.append({
            "input": str(m), "outputs": outputs, "tpu_ops": tpu, "cpu_ops": cpu,
            "edgetpu_subgraphs": subgraphs, "operators": counts,
            "prediction": _prediction_json(prediction),
            "comparison": compare(prediction, counts) if prediction and counts else None,
        })
    report = {
        "format": "gemma-edge/edgetpu-compile-report/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cmd, "returncode": returncode, "seconds": seconds,
        "compiler": {"path": cmd[0], "version": parsed.compiler_version},
        "options": options, "console": parsed.to_json(), "console_text": console,
        "models": entries,
    }
    report["policy"] = judge(entries, policy, segmented=bool(segments), ok=parsed.ok)
    return report


def _summary_for(parsed: CompileLog, output_name: str) -> Optional[ModelSummary]:
    for s in parsed.models:
        if Path(s.output_model).name == output_name:
            return s
    return None


def _op_totals(summaries: list[ModelSummary], counts: dict[str, dict[str, int]]
               ) -> tuple[Optional[int], Optional[int]]:
    """TPU and CPU op counts: the summary's own numbers when it printed them."""
    if summaries and all(s.cpu_ops is not None for s in summaries):
        return (sum(s.tpu_ops or 0 for s in summaries), sum(s.cpu_ops or 0 for s in summaries))
    if summaries and all(s.rows_complete for s in summaries) and counts:
        return (sum(c["tpu"] for c in counts.values()), sum(c["cpu"] for c in counts.values()))
    if summaries and all(s.all_mapped for s in summaries):
        return sum(s.total_ops or 0 for s in summaries), 0
    return None, None


def _prediction_json(p: Optional[MapperReport]) -> Optional[dict[str, Any]]:
    if p is None or not p.graphs:
        return None
    g = p.graphs[0]
    return {"compiles": p.compiles, "fatal": p.fatal, "tpu_ops": g.tpu_ops,
            "cpu_ops": len(g.ops) - g.tpu_ops, "cut": g.cut, "tpu_subgraphs": g.tpu_subgraphs,
            "streamed_bytes": g.streamed_bytes, "cached_bytes": g.cached_bytes}


def compare(prediction: MapperReport, actual: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per operator type: predicted vs real ops on the Edge TPU and on the CPU."""
    predicted: dict[str, dict[str, int]] = {}
    for o in prediction.graphs[0].ops if prediction.graphs else []:
        slot = predicted.setdefault(o.op, {"tpu": 0, "cpu": 0})
        slot["tpu" if o.mapped else "cpu"] += 1
    rows = []
    for op in sorted(set(predicted) | set(actual)):
        p = predicted.get(op, {"tpu": 0, "cpu": 0})
        a = actual.get(op, {"tpu": 0, "cpu": 0})
        rows.append({"op": op, "predicted_tpu": p["tpu"], "actual_tpu": a["tpu"],
                     "predicted_cpu": p["cpu"], "actual_cpu": a["cpu"]})
    agrees = all(r["predicted_tpu"] == r["actual_tpu"] and r["predicted_cpu"] == r["actual_cpu"]
                 for r in rows)
    return {"agrees": agrees, "operators": rows}


def judge(entries: list[dict[str, Any]], policy: Policy, segmented: bool,
          ok: bool) -> dict[str, Any]:
    """Apply ``policy`` to the parsed run; violations are short sentences."""
    violations = []
    for e in entries:
        name = Path(e["input"]).name
        if not ok:
            continue  # the compiler failed; that error is reported on its own
        if policy.require_mapped and e["tpu_ops"] == 0:
            violations.append(f"{name}: no operation was mapped to the Edge TPU")
        if policy.require_single_subgraph and not segmented and any(
                n > 1 for n in e["edgetpu_subgraphs"]):
            violations.append(f"{name}: {max(e['edgetpu_subgraphs'])} Edge TPU subgraphs; each "
                              "CPU round trip costs a host transfer (policy: one subgraph)")
        if policy.max_cpu_ops is not None:
            if e["cpu_ops"] is None:
                violations.append(f"{name}: the compiler did not report how many ops stay on "
                                  "the CPU, cannot check --max-cpu-ops")
            elif e["cpu_ops"] > policy.max_cpu_ops:
                violations.append(f"{name}: {e['cpu_ops']} ops run on the CPU, more than "
                                  f"--max-cpu-ops {policy.max_cpu_ops}")
    return {"max_cpu_ops": policy.max_cpu_ops,
            "require_single_subgraph": policy.require_single_subgraph,
            "require_mapped": policy.require_mapped, "passed": not violations,
            "violations": violations}
