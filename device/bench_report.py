"""``gemma-edge bench``'s printed report and its CI latency check (``--check``).

The check compares ratios measured in the same run (int8 vs float at the same bucket),
not absolute times, so it holds on a noisy shared machine; it also prints the absolute
figures against the 15 ms budget Google quotes for 256 tokens on an Edge TPU.
"""

from __future__ import annotations

import sys
from typing import Any

BUDGET_MS = 15.0


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    buckets = sorted({int(b) for r in results.values() for b in r["buckets"]})
    header = "bucket " + "".join(f"{p + ' p50/p90 ms':>24}" for p in results)
    print(header)
    for b in buckets:
        cells = []
        for r in results.values():
            s = r["buckets"].get(str(b))
            cells.append(f"{s['p50']:>13.1f} / {s['p90']:<8.1f}" if s else f"{'-':>24}")
        print(f"{b:>6} " + "".join(cells))
    for p, r in results.items():
        q = r["query_end_to_end_ms"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["query_stages_ms"].items()))
        qt = r.get("query_tokens", {})
        print(f"{p}: query ({qt.get('min')}-{qt.get('max')} tokens) end-to-end p50 "
              f"{q['p50']:.1f} ms p90 {q['p90']:.1f} p99 {q['p99']:.1f} "
              f"({stages} ms); peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f" ({r['peak_rss_after_bulk_mb']:.0f} MB after the queries and the bulk "
                 "documents, before the per-bucket sweep)" if "peak_rss_after_bulk_mb" in r
                 else ""))
        if "given_queries" in r:
            from .bench_queries import describe

            print(describe(p, r["given_queries"]))
        if "longer_query_end_to_end_ms" in r:
            lq, lt = r["longer_query_end_to_end_ms"], r["longer_query_tokens"]
            print(f"{p}: longer queries ({lt['min']}-{lt['max']} tokens) end-to-end p50 "
                  f"{lq['p50']:.1f} ms p90 {lq['p90']:.1f}")
        stages_mb = ", ".join(f"{k} {v:.0f}" for k, v in r.get("rss_stages_mb", {}).items()
                              if v is not None)
        if stages_mb:
            print(f"{p}: resident MB by stage: {stages_mb}; peak after the queries "
                  f"{r['peak_rss_after_queries_mb']:.0f} MB; weight cache "
                  f"{'on' if r.get('weight_cache') else 'off'}")
        kinds = r.get("resident_by_kind_mb")
        if kinds:
            after = "the queries and the bulk documents" if "bulk_speedup" in r else "the queries"
            print(f"{p}: resident MB by kind after {after}: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items(),
                                                               key=lambda kv: -kv[1])))
        if "bulk_speedup" in r:
            tokens = r.get("bulk_tokens")
            mix = (f" ({tokens['mean']:.1f} tokens on average with the prompt, median "
                   f"{tokens['median']:g}, max {tokens['max']})" if tokens else "")
            rate = (f" ({r['bulk_packed_tokens_per_s']:.0f} tokens/s)"
                    if "bulk_packed_tokens_per_s" in r else "")
            print(f"{p}: bulk {r['bulk_texts']} docs{mix}: packed {r['bulk_packed_texts_per_s']:.1f}"
                  f" texts/s{rate}, padded {r['bulk_padded_texts_per_s']:.1f} texts/s "
                  f"({r['bulk_speedup']:.2f}x; the two modes interleaved batch by batch)"
                  + (f"; the per-bucket p50s predict {r['bulk_model_speedup']:.2f}x for the "
                     f"same plans, at most {r['bulk_bound_speedup']:.2f}x for any packing"
                     if "bulk_model_speedup" in r else ""))
    for bucket, est in (report.get("edgetpu_estimate") or {}).items():
        if "ms" not in est:
            print(f"Edge TPU estimate {bucket}: {est}")
            continue
        per = ", ".join(f"{k} {v:.0f} ms" for k, v in est["ms"].items())
        print(f"Edge TPU estimate @ {bucket} tokens (pre-flight mapper, NOT measured): "
              f"{100 * est['mac_share']:.1f}% of MACs on the TPU; {per}")


def latency_check(report: dict[str, Any], max_ratio: float) -> int:
    """int8 must be at most ``max_ratio`` x float at the largest common bucket <= 256."""
    results = report["results"]
    if "float" not in results or "int8" not in results:
        print("latency check: needs both float and int8 graphs", file=sys.stderr)
        return 1
    common = sorted(set(results["float"]["buckets"]) & set(results["int8"]["buckets"]), key=int)
    bucket = max((b for b in common if int(b) <= 256), key=int, default=common[-1])
    f = results["float"]["buckets"][bucket]["p50"]
    q = results["int8"]["buckets"][bucket]["p50"]
    ratio = q / f
    ok = ratio <= max_ratio
    print(f"latency check @ {bucket} tokens: int8 {q:.1f} ms / float {f:.1f} ms = {ratio:.2f} "
          f"(limit {max_ratio:.2f}) -> {'PASS' if ok else 'FAIL'}")
    print(f"absolute: int8 {q:.1f} ms vs the {BUDGET_MS:.0f} ms Edge TPU budget for 256 tokens "
          f"({'within' if q <= BUDGET_MS else 'over'}; CPU figures, for scale)")
    return 0 if ok else 1
