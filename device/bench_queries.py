"""``gemma-edge bench --queries``: end-to-end latency over the user's own queries.

Why: the bench's built-in queries are sixteen fixed strings; what a user (or a reviewer)
wants to know is the p50 over *their* queries, e.g. the held-out set's, as
``Embedder.encode_query([q])`` sees them one at a time, and which buckets they land in
(query length decides the bucket, and the bucket most of the time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HELDOUT = "heldout"


def load_queries(spec: str) -> list[str]:
    """Queries from a file (one per line, or .jsonl with "text"), or ``heldout``: the
    project's held-out queries (needs the checkout's calibration_data/)."""
    from gemma_edge.errors import InputError

    if spec == HELDOUT:
        from gemma_edge.datasets import load_heldout

        queries = [q["text"] for q in load_heldout()[0]]
    else:
        from gemma_edge.cli import read_texts

        queries = read_texts(Path(spec))
    if not queries:
        raise InputError(f"{spec}: no queries in it")
    return queries


def query_lengths(emb: Any, queries: Sequence[str]) -> list[int]:
    """Tokens of each query as ``encode_query`` feeds it (prompt, BOS/EOS, the cut)."""
    ids, _ = emb.tokenizer.encode([emb.prompts.get("query", "") + q for q in queries],
                                  emb.max_tokens)
    return [len(x) for x in ids]


def time_queries(emb: Any, queries: Sequence[str]) -> dict[str, Any]:
    """Each query embedded alone once, end to end, after one untimed query per bucket.

    Returns the percentiles over all queries, their token counts (prompt included) and
    the p50 per bucket they fall into.
    """
    lengths = query_lengths(emb, queries)
    buckets = [emb.bucket_for(n) for n in lengths]
    for bucket in sorted(set(buckets)):  # warm-up: open each bucket's graph, size its arena
        emb.encode_query([queries[buckets.index(bucket)]])
    times = []
    for query in queries:
        start = time.perf_counter()
        emb.encode_query([query])
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1000.0
    per_bucket = {str(b): {"n": buckets.count(b),
                           "p50": float(np.percentile(ms[[x == b for x in buckets]], 50))}
                  for b in sorted(set(buckets))}
    return {"n": len(queries), "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "tokens": {"min": min(lengths), "median": float(np.median(lengths)),
                       "max": max(lengths)},
            "by_bucket": per_bucket, "times_ms": [round(float(t), 3) for t in ms]}


def describe(precision: str, figures: dict[str, Any]) -> str:
    tokens = figures["tokens"]
    buckets = ", ".join(f"{b} tokens {s['p50']:.1f} ms (n={s['n']})"
                        for b, s in figures["by_bucket"].items())
    return (f"{precision}: given queries ({figures['n']}, {tokens['min']}-{tokens['max']} tokens, "
            f"median {tokens['median']:g}) end-to-end p50 {figures['p50']:.1f} ms p90 "
            f"{figures['p90']:.1f} p99 {figures['p99']:.1f}; p50 by bucket: {buckets}")
