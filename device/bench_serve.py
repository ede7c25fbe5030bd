"""``gemma-edge serve-bench ART``: what the server's request batching buys under load.

Same run, same queries, same machine, alternating passes:
- one by one: ``Embedder.encode_query([q])`` in this process, one query at a time
  (what every app that loads its own Embedder does);
- batches of N, no HTTP: the same Embedder, N queries per ``encode_query`` call, packed
  as the server packs them: the most any request batching can reach with these graphs
  on this machine (the server cannot batch more than N clients' requests);
- server: ``gemma-edge serve`` in a child process and N client threads, each
  sending one query per request over a keep-alive HTTP connection.
Reports requests/s, p50/p99 latency and failures per pass, the speedup, the
server's mean batch size, and the lowest cosine between a query's vector from the
server and from the one-by-one Embedder (both paths must embed the same thing).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from gemma_edge.errors import GemmaEdgeError, InputError

from .serve_cli import serve_pack_tokens


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def start_server(args: argparse.Namespace, port: int, timeout: float = 900.0) -> subprocess.Popen:
    """``gemma-edge serve`` as a child process, returned once /ready says so."""
    command = [sys.executable, "-m", "gemma_edge.cli", "serve", str(args.artifacts),
               "--port", str(port), "--backend", args.backend, "--precision", args.precision]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.device:
        command += ["--device", args.device]
    if args.pack_tokens is not None:
        command += ["--pack-tokens", str(args.pack_tokens)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GemmaEdgeError(f"the server exited ({proc.returncode}) before it was ready: "
                                 f"{(proc.stderr.read() if proc.stderr else '').strip()[-400:]}")
        try:
            status, body = get_json(port, "/ready")
            if status == 200:
                return proc
            if body and body.get("status") == "failed":
                proc.terminate()
                raise GemmaEdgeError(f"the server failed to load: {body.get('error')}")
        except OSError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise GemmaEdgeError(f"the server was not ready within {timeout:.0f} s")


def server_pass(port: int, queries: Sequence[str], clients: int) -> Dict[str, Any]:
    """Every query once, by ``clients`` threads pulling from one shared list."""
    latencies: List[float] = [0.0] * len(queries)
    vectors: List[Optional[np.ndarray]] = [None] * len(queries)
    failures: List[str] = []
    lock = threading.Lock()
    cursor = iter(range(len(queries)))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                break
            body = json.dumps({"input": queries[i], "input_type": "query",
                               "encoding_format": "base64"})
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                latencies[i] = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
                data = json.loads(payload)["data"][0]["embedding"]
                vectors[i] = np.frombuffer(base64.b64decode(data), dtype="<f4")
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                with lock:
                    failures.append(f"query {i}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "latencies": latencies, "vectors": vectors, "failures": failures}


def direct_pass(embedder: Any, queries: Sequence[str]) -> Dict[str, Any]:
    latencies, vectors = [], []
    started = time.perf_counter()
    for query in queries:
        t0 = time.perf_counter()
        vectors.append(embedder.encode_query([query])[0])
        latencies.append(time.perf_counter() - t0)
    return {"wall_s": time.perf_counter() - started, "latencies": latencies,
            "vectors": vectors, "failures": []}


def batched_pass(embedder: Any, queries: Sequence[str], batch: int) -> Dict[str, Any]:
    """The queries ``batch`` at a time through the bench's own Embedder, packed as the
    server packs them, with no HTTP: how far request batching can go with these graphs
    on this machine (per-text latency is its batch's)."""
    latencies: List[float] = []
    vectors: List[np.ndarray] = []
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        group = list(queries[start:start + batch])
        t0 = time.perf_counter()
        vectors.extend(embedder.encode_query(group))
        latencies.extend([time.perf_counter() - t0] * len(group))
    return {"wall_s": time.perf_counter() - started, "latencies": latencies,
            "vectors": vectors, "failures": []}


def summarise(passes: List[Dict[str, Any]]) -> Dict[str, Any]:
    ms = np.asarray([t for p in passes for t in p["latencies"]]) * 1000.0
    requests = len(ms)
    wall = sum(p["wall_s"] for p in passes)
    return {"requests": requests, "seconds": round(wall, 3),
            "req_per_s": round(requests / wall, 2) if wall > 0 else float("nan"),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "failures": sum(len(p["failures"]) for p in passes),
            "latencies_ms": [round(float(t), 2) for t in ms]}


def run_bench(args: argparse.Namespace) -> int:
    from gemma_edge.cli import make_embedder

    from .bench_queries import HELDOUT, load_queries

    queries = load_queries(str(args.queries) if args.queries else HELDOUT)
    if not Path(args.artifacts, "manifest.json").is_file():
        raise InputError(f"{args.artifacts}: no manifest.json; pass an artifacts directory")
    embedder = make_embedder(args)
    # single texts never pack, so one Embedder serves the one-by-one and the batched passes
    embedder.pack_tokens = serve_pack_tokens(embedder, args.pack_tokens)
    for query in queries[:4]:  # warm-up: open the graphs the queries use
        embedder.encode_query([query])
    batched_pass(embedder, queries[:args.clients * 2], args.clients)
    port = args.port or free_port()
    server = start_server(args, port)
    direct: List[Dict[str, Any]] = []
    batched: List[Dict[str, Any]] = []
    served: List[Dict[str, Any]] = []
    try:
        server_pass(port, queries[:args.clients * 2], args.clients)  # warm the server's graphs
        _, before = get_json(port, "/health")
        for r in range(args.rounds):  # alternate the order so neither always runs first
            order = ("direct", "batched", "server")
            for mode in order if r % 2 == 0 else order[::-1]:
                if mode == "direct":
                    direct.append(direct_pass(embedder, queries))
                elif mode == "batched":
                    batched.append(batched_pass(embedder, queries, args.clients))
                else:
                    served.append(server_pass(port, queries, args.clients))
        _, after = get_json(port, "/health")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    one, bound, many = summarise(direct), summarise(batched), summarise(served)
    cosines = [float(np.dot(a, b)) for p, d in zip(served, direct)
               for a, b in zip(p["vectors"], d["vectors"]) if a is not None]
    batches = after["batches"] - before["batches"]
    report = {"artifacts": str(args.artifacts), "queries": len(queries), "rounds": args.rounds,
              "clients": args.clients, "backend": embedder.backend,
              "graph_role": embedder.graph_role, "pack_tokens": embedder.pack_tokens,
              "one_by_one": one, "batched_in_process": bound, "server": many,
              "speedup": round(many["req_per_s"] / one["req_per_s"], 2),
              "batching_bound": round(bound["req_per_s"] / one["req_per_s"], 2),
              "server_mean_batch": round((after["texts"] - before["texts"]) / max(batches, 1), 2),
              "min_cosine_server_vs_direct": round(min(cosines), 6) if cosines else None}
    print(f"{len(queries)} queries x {args.rounds} rounds, {embedder.backend} "
          f"{embedder.graph_role}, {args.clients} clients")
    rows = (("one by one", one), (f"batches of {args.clients}, no HTTP", bound),
            (f"server x{args.clients}", many))
    for name, row in rows:
        print(f"  {name:<24} {row['req_per_s']:8.2f} req/s  p50 {row['p50_ms']:7.1f} ms  "
              f"p99 {row['p99_ms']:7.1f} ms  failures {row['failures']}/{row['requests']}")
    print(f"  speedup {report['speedup']:.2f}x (in-process batches of {args.clients}, the "
          f"graphs' bound: {report['batching_bound']:.2f}x); server mean batch "
          f"{report['server_mean_batch']} texts; min cosine server vs one-by-one "
          f"{report['min_cosine_server_vs_direct']}")
    from gemma_edge.reporting import save_report

    from .bench_plot import plot_serve_report

    save_report(report, args.json, args.plot, plot_serve_report)
    return 1 if many["failures"] else 0
