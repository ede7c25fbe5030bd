"""``gemma-edge check`` and ``gemma-edge compile``.

The main CLI imports this module to build its parser on small boards too, so
nothing heavy is imported here at module level: the mapper (numpy,
ai-edge-litert) and the compiler wrapper load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gemma_edge.errors import ArtifactError, InputError

from .bucket_census import graph_files, segmented_summary

TARGETS = ("usb", "pcie", "devboard")
CLOCKS = ("std", "max")
DEFAULT_TIMEOUT_S = 600.0


def register(sub: Any) -> None:
    """Add the ``check`` and ``compile`` sub-commands to an argparse sub-parsers object."""
    p = sub.add_parser("check", help="predict which ops edgetpu_compiler maps (no compiler "
                       "needed) and estimate Edge TPU latency")
    p.add_argument("model", type=Path, metavar="MODEL.tflite|ARTIFACTS_DIR",
                   help="an int8 .tflite, or an artifacts directory (checks its 'edgetpu' graphs)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--target", choices=TARGETS, default=None, help="only this Coral device")
    p.add_argument("--clock", choices=CLOCKS, default=None,
                   help="libedgetpu1-std or libedgetpu1-max clock (default: both)")
    p.add_argument("--min-runtime", type=int, default=None,
                   help="oldest Edge TPU runtime to target (compiler -m; default 14)")
    p.add_argument("--multiple-subgraphs", action="store_true",
                   help="predict edgetpu_compiler -a (one Edge TPU subgraph per mappable run)")
    p.set_defaults(func=run_check)

    c = sub.add_parser("compile", help="compile int8 graphs with edgetpu_compiler and record "
                       "them in the manifest")
    c.add_argument("source", type=Path, metavar="MODEL.tflite|ARTIFACTS_DIR",
                   help="a .tflite, or an artifacts directory (compiles its 'edgetpu' graphs "
                   "and adds 'edgetpu-compiled' entries to manifest.json)")
    c.add_argument("--out", type=Path, default=None,
                   help="output folder for a single model (default: beside it)")
    c.add_argument("--segments", type=int, default=None,
                   help="pipeline the model over N Edge TPUs (compiler -n)")
    c.add_argument("--min-runtime", type=int, default=None,
                   help="oldest Edge TPU runtime the output must load on (compiler -m)")
    c.add_argument("--max-cpu-ops", type=int, default=None,
                   help="fail when more than N ops stay on the CPU")
    c.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds per compilation (default {DEFAULT_TIMEOUT_S:.0f})")
    c.add_argument("--search-delegate", action="store_true",
                   help="let the compiler search for an earlier stopping point (compiler -d)")
    c.set_defaults(func=run_compile)


def _manifest_graphs(art: Path, role: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from gemma_edge.manifest import graphs_for_role, load_manifest

    manifest = load_manifest(art)
    graphs = graphs_for_role(manifest, role)
    if not graphs:
        raise ArtifactError(f"{art}: the manifest has no graph of role {role!r} (the full-int8 "
                            "graph the Edge TPU needs); re-export with quantisation enabled")
    return manifest, graphs


def format_summary(bucket: str, s: dict[str, Any], target: Any, clock: Any) -> str:
    from .report_text import mib

    lines = [f"bucket {bucket}: {s['models']} co-compiled segments, {s['tpu_ops']}/{s['ops']} "
             f"ops and {100 * s['mac_share']:.2f}% of MACs on the Edge TPU (host: norms, "
             f"residual, pooling, Dense head); parameters {mib(s['param_bytes'])}: "
             f"{mib(s['cached_bytes'])} cached, {mib(s['streamed_bytes'])} streamed per "
             f"inference; {s['edgetpu_calls']} Edge TPU calls"]
    for e in s["estimates"]:
        if target in (None, e["target"]) and clock in (None, e["clock"]):
            lines.append(f"  {e['target']:<8} {e['clock']:<3} {1000 * e['total_s']:8.1f} ms "
                         f"({e['bound']}-bound)")
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    """Print the pre-flight report; exit 1 when the compiler would reject a model."""
    from .mapper import analyze
    from .rules import DEFAULT_MIN_RUNTIME

    paths = [args.model]
    graphs: list[dict[str, Any]] = []
    if args.model.is_dir():
        _, graphs = _manifest_graphs(args.model, "edgetpu")
        paths = [args.model / p for g in graphs for p in graph_files(g)]
    reports = [analyze(p, args.min_runtime or DEFAULT_MIN_RUNTIME, args.multiple_subgraphs)
               for p in paths]
    by_path = {str(p): r for p, r in zip(paths, reports)}
    summaries = {}
    if args.model.is_dir():
        for g in graphs:
            if g.get("layout") == "segments":
                seg_reports = [by_path[str(args.model / f)].to_json()["graphs"][0]
                               for f in g["segments"]]
                summaries[str(g["seq_lens"][0])] = segmented_summary(args.model, g, seg_reports)
    if args.json:
        docs = []
        for r in reports:
            doc = r.to_json()
            for g in doc["graphs"]:
                g["estimates"] = [e for e in g["estimates"]
                                  if args.target in (None, e["target"])
                                  and args.clock in (None, e["clock"])]
            docs.append(doc)
        if summaries:
            print(json.dumps({"segments": docs, "buckets": summaries}, indent=2))
        else:
            print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        print("\n\n".join(r.format_table(args.target, args.clock) for r in reports))
        for bucket, s in summaries.items():
            print(format_summary(bucket, s, args.target, args.clock))
    return 0 if all(r.compiles for r in reports) else 1


def run_compile(args: argparse.Namespace) -> int:
    from .compiler import Policy, compile_model

    policy = Policy(max_cpu_ops=args.max_cpu_ops)
    options = {"segments": args.segments, "min_runtime": args.min_runtime,
               "timeout": args.timeout, "policy": policy, "search_delegate": args.search_delegate}
    if args.source.is_dir():
        return _compile_artifacts(args.source, args.out, options)
    if not args.source.is_file():
        raise InputError(f"{args.source}: no such file or directory")
    out = args.out or args.source.parent
    result = compile_model(args.source, out, **options)
    _print_result(result)
    return 0


def _compile_artifacts(art: Path, out: Any, options: dict[str, Any]) -> int:
    """Compile every 'edgetpu' graph; then add 'edgetpu-compiled' entries to the manifest.

    The manifest is rewritten once, atomically, after all graphs compiled: a failure
    leaves it as it was (compiled files already written stay unlisted).
    """
    from gemma_edge.atomic_files import atomic_write_json
    from gemma_edge.manifest import MANIFEST_NAME, describe_files

    from .compiler import compile_model

    if out is not None and Path(out).resolve() != art.resolve():
        raise InputError(f"--out {out}: with an artifacts directory the compiled graphs go "
                         "into it, so that its manifest can list them; drop --out")
    manifest, sources = _manifest_graphs(art, "edgetpu")
    results = []
    for graph in sources:
        files = graph_files(graph)
        if len(files) > 1 and options["segments"]:
            raise InputError("--segments pipelines one graph over several Edge TPUs; this "
                             "export is already split per layer (co-compiled instead)")
        # per-layer segments of one bucket are co-compiled: one call, one parameter cache
        out_dir = (art / files[0]).parent
        result = compile_model(art / files[0], out_dir, extra_models=[art / f for f in files[1:]],
                               **options)
        _print_result(result)
        results.append((graph, result, out_dir))
    compiled_from = {_source_key(g) for g, _, _ in results}
    graphs = [g for g in manifest["graphs"]
              if not (g.get("role") == "edgetpu-compiled" and g.get("source") in compiled_from)]
    new_files: list[str] = []
    for graph, result, out_dir in results:
        def rel(p: Path, out_dir: Path = out_dir) -> str:
            return (out_dir / p.name).relative_to(art).as_posix()

        entry = {k: v for k, v in graph.items() if k not in ("path", "role", "segments")}
        entry.update(role="edgetpu-compiled", source=_source_key(graph),
                     compiler={"version": result.report["compiler"]["version"],
                               "min_runtime": options["min_runtime"],
                               "segments": options["segments"]},
                     compile_report=rel(result.report_path),
                     operation_logs=[rel(p) for item in result.models for p in item.logs])
        if graph.get("layout") == "segments":
            entry.update(path=graph["path"],
                         segments=[rel(item.outputs[0]) for item in result.models])
        else:
            entry["path"] = rel(result.models[0].outputs[0])
            if options["segments"]:
                entry["segment_paths"] = [rel(p) for p in result.models[0].outputs]
        graphs.append(entry)
        new_files += [rel(p) for item in result.models for p in item.outputs + item.logs]
        new_files.append(rel(result.report_path))
    updated = dict(manifest)
    updated["graphs"] = graphs
    updated["files"] = {**manifest["files"], **describe_files(art, new_files)}
    atomic_write_json(art / MANIFEST_NAME, updated)
    print(f"updated {art / MANIFEST_NAME}: {len(results)} edgetpu-compiled graph(s)")
    return 0


def _source_key(graph: dict[str, Any]) -> str:
    """What an edgetpu-compiled entry was built from (segments share one host file)."""
    if graph.get("layout") == "segments":
        return f"{graph['path']}#{','.join(str(t) for t in graph['seq_lens'])}"
    return graph["path"]


def _print_result(result: Any) -> None:
    from .report_text import mib

    for entry in result.report["models"]:
        outs = ", ".join(o["path"] for o in entry["outputs"])
        summaries = [o["summary"] for o in entry["outputs"] if o["summary"]]
        cached = sum(s.get("on_chip_used") or 0 for s in summaries)
        streamed = sum(s.get("off_chip_streamed") or 0 for s in summaries)
        total = (entry["tpu_ops"] or 0) + (entry["cpu_ops"] or 0)
        line = (f"{Path(entry['input']).name} -> {outs}: {entry['tpu_ops']}/{total} ops on the "
                f"Edge TPU, {mib(cached)} cached, {mib(streamed)} streamed per inference")
        if entry["comparison"] is not None:
            line += ("; matches the pre-flight" if entry["comparison"]["agrees"]
                     else "; differs from the pre-flight (see the report)")
        print(line)
    print(f"report: {result.report_path}")
