"""``gemma-edge bench``: latency per bucket, per stage, bulk throughput and peak RSS.

Each precision runs in its own child process so its peak RSS is its own and one
graph's packed weights do not sit in the other's measurements. Figures are
printed and, on request, written as JSON and drawn as a PNG.

``--check`` is the CI latency check: it compares ratios measured in the same
run (int8 vs float at the same bucket), not absolute times, so it holds on a
noisy shared machine; it also prints the absolute figures against the 15 ms
budget Google quotes for 256 tokens on an Edge TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .bench_report import latency_check, print_report

QUERIES = ["how do I reset my router", "beste Pizza in Berlin Mitte", "síntomas de la gripe",
           "東京 天気 明日", "python read large csv", "تحديث نظام التشغيل", "prix du train Paris Lyon",
           "how long does a passport renewal take"]
# Longer queries, like the held-out set's (16-37 tokens with the prompt, median 22): the
# short list above fits the 16-token bucket, these mostly the 32-token one.
LONGER_QUERIES = [
    "what is the difference between a heat pump and an air conditioner in winter",
    "wie kann ich meine Steuererklärung online einreichen ohne ELSTER Zertifikat",
    "cuáles son los requisitos para renovar el pasaporte español en el extranjero",
    "comment configurer un serveur ssh sur un raspberry pi sans écran",
    "python asyncio gather vs wait for many http requests at once",
    "古いノートパソコンのバッテリー寿命を延ばす方法を教えてください",
    "ما هي أفضل طريقة لتعلم البرمجة للمبتدئين في المنزل",
    "how do text embeddings make offline semantic search work on small devices"]
DOC_SENTENCE = ("Edge devices embed text locally so that private notes never leave the machine, "
                "and the index is searched offline. ")


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "n": int(arr.size)}


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _current_rss_mb() -> Optional[float]:
    """Resident set now (Linux /proc/self/statm), for the memory breakdown; None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)


RESIDENT_KINDS = (  # (kind, test on the mapping's path), first match wins
    ("packed weights (XNNPACK cache)", lambda path: path.endswith(".xnnpack")),
    ("graph files (.tflite)", lambda path: path.endswith(".tflite")),
    ("embedding table (.npy)", lambda path: path.endswith(".npy")),
    ("libraries (.so)", lambda path: ".so" in path.rsplit("/", 1)[-1]),
    ("heap + anonymous (arenas, tokenizer, Python)", lambda path: path in ("", "[heap]")),
)


def resident_by_kind() -> Optional[dict[str, float]]:
    """Resident MB per kind of mapping (Linux /proc/self/smaps); None elsewhere.

    Why: peak RSS alone does not say what a smaller budget would have to give up; the
    split shows the packed int8 weights, the runtime's arenas and the tokenizer (heap),
    the libraries and the mapped files separately.
    """
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
            lines = smaps.readlines()
    except OSError:
        return None
    totals: dict[str, float] = {}
    kind = "other"
    for line in lines:
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping line
            path = head[5].strip() if len(head) == 6 else ""
            kind = next((name for name, test in RESIDENT_KINDS if test(path)), "other")
        elif line.startswith("Rss:"):
            totals[kind] = totals.get(kind, 0.0) + int(line.split()[1]) / 1024.0
    return {k: round(v, 1) for k, v in totals.items()}


def bulk_texts(count: int, seed: int = 0) -> list[str]:
    """Mixed-length documents: mostly short, a tail of long ones (like a notes folder)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.3, sigma=0.9, size=count), 1, 60).astype(int)
    words = DOC_SENTENCE.split()
    return [" ".join(words[(i + k) % len(words)] for k in range(n * 4))
            for i, n in enumerate(lengths)]


BULK_MODES = ("packed", "padded")
BULK_BATCH = 64  # documents per encode_document call, as an indexer feeds them


def _pack_tokens(emb: Any, label: str) -> int:
    """The Embedder's packing bound for a bulk mode (0: every text padded to its bucket)."""
    return min(emb.max_tokens, 256) if label == "packed" else 0


@contextmanager
def _bulk_mode(emb: Any, label: str) -> Iterator[None]:
    """The Embedder set to one bulk mode, its own packing bound given back afterwards."""
    saved = emb.pack_tokens
    emb.pack_tokens = _pack_tokens(emb, label)
    try:
        yield
    finally:
        emb.pack_tokens = saved


def bulk_passes(emb: Any, docs: Sequence[str], batch: int = BULK_BATCH) -> dict[str, float]:
    """Seconds to embed ``docs`` packed and padded, the two modes interleaved batch by batch.

    Why interleaved: this machine's speed drifts by tens of percent within minutes, so two
    back-to-back passes measured the drift as much as the packing (1.32-1.95x across
    sessions). Alternating the modes on each batch, and which goes first, exposes both to
    the same machine. Each mode runs one untimed batch first, so neither pays for opening
    graphs.
    """
    seconds = {label: 0.0 for label in BULK_MODES}
    for label in BULK_MODES:
        with _bulk_mode(emb, label):
            emb.encode_document(list(docs[:batch]))
    for k, start in enumerate(range(0, len(docs), batch)):
        for label in BULK_MODES if k % 2 == 0 else BULK_MODES[::-1]:
            with _bulk_mode(emb, label):
                t0 = time.perf_counter()
                emb.encode_document(list(docs[start:start + batch]))
                seconds[label] += time.perf_counter() - t0
    return seconds


def planned_speedup(emb: Any, docs: Sequence[str], bucket_ms: dict[int, float],
                    batch: int = BULK_BATCH) -> dict[str, Any]:
    """Packed / padded speed that the per-bucket latencies predict for the bulk batches.

    ``plan``: the Embedder's own plan for each batch, costed at each bucket's p50 (graph
    alone): what its packing gains on this mix of lengths, per-call overheads and drift
    left out. ``bound``: every token packed without a gap into the bucket that is cheapest
    per token - what no plan can beat with these graphs, so it says whether a speed-up
    target is within reach at all. ``tokens``: the mix's length (mean, median, max).
    """
    from gemma_edge.device.embedder import document_text

    full = [document_text(d) for d in docs]
    lengths = [len(ids) for ids in emb.tokenizer.encode(full, emb.max_tokens)[0]]
    cost = {}
    for label in BULK_MODES:
        with _bulk_mode(emb, label):
            cost[label] = sum(bucket_ms[seq_len]
                              for start in range(0, len(lengths), batch)
                              for seq_len, _ in emb.plan(lengths[start:start + batch]))
    cheapest = min(ms / seq_len for seq_len, ms in bucket_ms.items())
    return {"plan": cost["padded"] / cost["packed"],
            "bound": cost["padded"] / (sum(lengths) * cheapest),
            "tokens": {"mean": float(np.mean(lengths)), "median": float(np.median(lengths)),
                       "max": int(max(lengths))}}


def measure(artifacts: Path, backend: str, precision: str, runs: int, bulk: int,
            threads: Optional[int], max_open_graphs: Optional[int] = None,
            weight_cache: bool = True, given_queries: Optional[Sequence[str]] = None
            ) -> dict[str, Any]:
    """All figures for one (backend, precision); runs in the current process."""
    rss = {"python_numpy": _current_rss_mb()}
    from gemma_edge.device import Embedder
    from gemma_edge.device.packing import bucket_inputs

    from .bench_queries import query_lengths

    emb = Embedder(artifacts, backend=backend, precision=precision, num_threads=threads,
                   max_open_graphs=max_open_graphs, weight_cache=None if weight_cache else False)
    # What the resident set holds, stage by stage (current RSS, MB): the runtime library,
    # the tokenizer and the table mapping, then the query bucket's weights and arena.
    rss["embedder_opened"] = _current_rss_mb()
    result: dict[str, Any] = {"backend": emb.backend, "precision": precision,
                              "max_open_graphs": max_open_graphs,
                              "weight_cache": emb.graphs.weight_cache is not None, "rss_stages_mb": rss,
                              "graph_role": emb.graph_role, "threads": threads, "buckets": {}}
    # Queries first, as an interactive process sees them: only the query buckets are open.
    for key, queries in (("query", QUERIES), ("longer_query", LONGER_QUERIES)):
        emb.encode_query(queries[:1])  # warm-up of the query bucket
        emb.stage_seconds.clear()
        times = []
        for i in range(runs):
            start = time.perf_counter()
            emb.encode_query([queries[i % len(queries)]])
            times.append(time.perf_counter() - start)
        result[f"{key}_end_to_end_ms"] = _percentiles(times)
        result[f"{key}_times_ms"] = [round(t * 1000.0, 3) for t in times]
        result[f"{key}_stages_ms"] = {k: 1000.0 * v / runs for k, v in emb.stage_seconds.items()}
        lengths = query_lengths(emb, queries)
        result[f"{key}_tokens"] = {"min": min(lengths), "max": max(lengths)}
    if given_queries:
        from .bench_queries import time_queries

        result["given_queries"] = time_queries(emb, given_queries)
    rss["after_queries"] = _current_rss_mb()
    result["peak_rss_after_queries_mb"] = _peak_rss_mb()

    if bulk:
        docs = bulk_texts(bulk)
        seconds = bulk_passes(emb, docs)
        for label in BULK_MODES:
            result[f"bulk_{label}_texts_per_s"] = len(docs) / seconds[label]
        result["bulk_texts"] = len(docs)
        result["bulk_speedup"] = result["bulk_packed_texts_per_s"] / result["bulk_padded_texts_per_s"]
        # before the per-bucket sweep opens every graph: a process that embeds documents
        result["peak_rss_after_bulk_mb"] = _peak_rss_mb()
        rss["after_bulk"] = _current_rss_mb()
    result["resident_by_kind_mb"] = resident_by_kind()

    rng = np.random.default_rng(0)
    for seq_len in emb.buckets:  # the graph alone, full bucket of one text
        runner = emb.runner(seq_len)
        rows = (rng.standard_normal((1, seq_len, emb.hidden)) * 0.03).astype(np.float32)
        mask, pool = bucket_inputs([seq_len], seq_len, emb.slots)
        for _ in range(3):  # warm-up: first runs page weights in and size the arenas
            runner.run(rows, mask, pool)
        n = max(3, runs)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            runner.run(rows, mask, pool)
            times.append(time.perf_counter() - start)
        result["buckets"][str(seq_len)] = _percentiles(times)
    if bulk:
        bucket_ms = {int(b): stats["p50"] for b, stats in result["buckets"].items()}
        predicted = planned_speedup(emb, docs, bucket_ms)
        result["bulk_model_speedup"], result["bulk_bound_speedup"] = predicted["plan"], predicted["bound"]
        result["bulk_tokens"] = predicted["tokens"]
        # what bulk indexing delivers, in the unit that does not depend on the mix: texts/s
        # alone rewards short documents (issue 22 retired the packed/padded ratio as a target)
        for label in BULK_MODES:
            result[f"bulk_{label}_tokens_per_s"] = (result[f"bulk_{label}_texts_per_s"]
                                                    * predicted["tokens"]["mean"])

    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _child(args: argparse.Namespace, precision: str, queries_file: str = "-") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gemma_edge.device.bench", "--child", str(args.artifacts),
           args.backend, precision, str(args.runs), str(args.bulk), str(args.threads or 0),
           str(args.max_open_graphs or 0), "0" if args.no_weight_cache else "1", queries_file]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        from gemma_edge.errors import GemmaEdgeError

        raise GemmaEdgeError(f"benchmark of {precision} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def edgetpu_estimate(artifacts: Path, manifest: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The pre-flight mapper's Edge TPU estimate per "edgetpu" graph (workstation only).

    The mapper lives in gemma_edge.compile and needs ai-edge-litert's flatbuffer
    schema; on a board without them the estimate is simply left out.
    """
    from gemma_edge.manifest import graphs_for_role

    graphs = graphs_for_role(manifest, "edgetpu")
    if not graphs:
        return None
    try:
        from gemma_edge.compile.mapper import analyze
    except ImportError:
        return None
    from gemma_edge.compile.bucket_census import segmented_summary
    from gemma_edge.graph_entries import GraphEntry

    out: dict[str, Any] = {}
    for graph in graphs:
        entry = GraphEntry.from_json(graph)
        try:
            reports = [analyze(Path(artifacts) / f).to_json() for f in entry.graph_files]
            if entry.is_segments:
                g = segmented_summary(Path(artifacts), graph,
                                      [r["graphs"][0] for r in reports])
            else:
                g = reports[0]["graphs"][0]
        except Exception as exc:  # noqa: BLE001 - an estimate is optional in a benchmark
            out[entry.path] = {"error": str(exc)}
            continue
        out[str(entry.seq_lens[0])] = {
            "compiles": all(r["compiles"] for r in reports), "mac_share": g["mac_share"],
            "op_share": g["op_share"], "streamed_bytes": g["streamed_bytes"],
            "ms": {f"{e['target']}-{e['clock']}": round(1000 * e["total_s"], 1)
                   for e in g["estimates"]}}
    return out


def run(args: argparse.Namespace) -> int:
    from gemma_edge.graph_entries import PRECISION_ROLE
    from gemma_edge.manifest import graphs_for_role, load_manifest
    from gemma_edge.reporting import check_report_paths

    check_report_paths(args.json, args.plot)
    manifest = load_manifest(args.artifacts)
    wanted = args.precisions.split(",")
    precisions = [p for p in wanted if graphs_for_role(manifest, PRECISION_ROLE.get(p, p))]
    report: dict[str, Any] = {"artifacts": str(args.artifacts), "machine": machine(),
                              "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        queries_file = "-"
        if args.queries:  # read (and refused) here, before any child starts
            from .bench_queries import load_queries

            queries_file = str(Path(tmp) / "queries.json")
            Path(queries_file).write_text(json.dumps(load_queries(args.queries)), encoding="utf-8")
        for precision in precisions:
            print(f"benchmarking {precision} ...", file=sys.stderr, flush=True)
            report["results"][precision] = _child(args, precision, queries_file)
    report["edgetpu_estimate"] = edgetpu_estimate(args.artifacts, manifest)
    print_report(report)
    status = 0
    if args.check:
        status = latency_check(report, args.max_ratio)
    from gemma_edge.reporting import save_report

    from .bench_plot import plot_report

    save_report(report, args.json, args.plot, plot_report)
    return status


def machine() -> dict[str, Any]:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": platform.platform()}


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="latency, throughput and memory of an artifacts directory")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--backend", choices=("auto", "cpu", "edgetpu"), default="cpu")
    p.add_argument("--precisions", default="float,int8,full-int8",
                   help="comma list; those without a graph are skipped")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20, help="timed runs per bucket (>= 20 for p99)")
    p.add_argument("--bulk", type=int, default=200, help="documents for the bulk test (0: skip)")
    p.add_argument("--queries", default=None,
                   help="also time these queries one by one, end to end: a file (one per line, "
                        "or .jsonl with 'text'), or 'heldout' for the project's held-out queries")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--max-open-graphs", type=int, default=None,
                   help="bound on open per-bucket graphs (RAM on small boards; see Embedder)")
    p.add_argument("--no-weight-cache", action="store_true",
                   help="open CPU graphs without XNNPACK's weight cache (packs in memory)")
    p.add_argument("--check", action="store_true", help="CI latency check (int8 vs float ratio)")
    p.add_argument("--max-ratio", type=float, default=0.5)
    p.set_defaults(func=run)


def _child_main(argv: Sequence[str]) -> None:
    art, backend, precision, runs, bulk, threads, max_open, weight_cache, queries_file = argv
    queries = None if queries_file == "-" else json.loads(Path(queries_file).read_text("utf-8"))
    out = measure(Path(art), backend, precision, int(runs), int(bulk), int(threads) or None,
                  int(max_open) or None, weight_cache == "1", queries)
    print(json.dumps(out))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child_main(sys.argv[2:])
