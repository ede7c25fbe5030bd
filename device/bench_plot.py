"""Draw a ``gemma-edge bench`` report: latency per bucket and the query latency distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_edge.errors import InputError


def plot_report(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("--plot needs matplotlib (pip install matplotlib)") from exc
    from gemma_edge.reporting import save_figure

    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(results))
    buckets = sorted({int(b) for r in results.values() for b in r["buckets"]})
    for k, (name, r) in enumerate(results.items()):
        xs = [i + k * width for i, b in enumerate(buckets) if str(b) in r["buckets"]]
        stats = [r["buckets"][str(b)] for b in buckets if str(b) in r["buckets"]]
        p50 = [s["p50"] for s in stats]
        err = [[0] * len(stats), [s["p90"] - s["p50"] for s in stats]]
        left.bar(xs, p50, width, yerr=err, capsize=3, label=name)
    left.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(buckets))])
    left.set_xticklabels([str(b) for b in buckets])
    left.set_yscale("log")
    left.set_xlabel("bucket (tokens)")
    left.set_ylabel("graph latency, ms (p50, bar to p90)")
    left.set_title("Encoder graph latency per bucket")
    left.legend()
    boxes, labels = [], []
    for name, r in results.items():  # short and longer queries (their token ranges)
        for key in ("query", "longer_query"):
            if f"{key}_times_ms" in r:
                tokens = r.get(f"{key}_tokens", {})
                boxes.append(r[f"{key}_times_ms"])
                labels.append(f"{name}\n{tokens.get('min')}-{tokens.get('max')} tok")
        given = r.get("given_queries")
        if given:  # bench --queries: the user's own
            boxes.append(given["times_ms"])
            labels.append(f"{name}, given\n{given['tokens']['min']}-{given['tokens']['max']} tok")
    right.boxplot(boxes, showfliers=True)
    right.set_xticks(range(1, len(boxes) + 1))
    right.set_xticklabels(labels)
    right.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    for axis in (right.yaxis.set_major_formatter, right.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # plain ms on the log axis
    right.axhline(15.0, color="red", linestyle="--", label="15 ms budget")
    right.set_ylabel("ms")
    right.set_title("Queries, text in -> vector out (end to end)")
    right.legend()
    cpu = report.get("machine", {}).get("cpu", "")
    fig.suptitle(f"gemma-edge bench - {cpu}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
