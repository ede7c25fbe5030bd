"""Draw ``gemma-edge bench`` (latency per bucket, query latency distribution) and
``gemma-edge serve-bench`` reports (latency distributions and rates of its passes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_edge.errors import InputError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("--plot needs matplotlib (pip install matplotlib)") from exc
    return plt


def plot_report(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
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


SERVE_PASSES = (("one_by_one", "one by one"), ("batched_in_process", "batches of N, no HTTP"),
                ("server", "server, N clients"))


def plot_serve_report(report: dict[str, Any], path: Path) -> None:
    """Left: each pass's per-request latency as a cumulative distribution (log time);
    right: its requests/s, the one-by-one rate and twice it marked."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from gemma_edge.reporting import save_figure

    clients = report["clients"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names, rates = [], []
    for key, label in SERVE_PASSES:
        row = report[key]
        label = label.replace("N", str(clients))
        ms = np.sort(np.asarray(row["latencies_ms"], dtype=float))
        left.plot(ms, np.arange(1, len(ms) + 1) / max(len(ms), 1), label=label)
        names.append(label)
        rates.append(row["req_per_s"])
    left.set_xscale("log")
    left.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("latency per request, ms (log scale)")
    left.set_ylabel("fraction of requests")
    left.set_title("Latency distribution")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower right")
    right.bar(range(len(rates)), rates, color=["tab:blue", "tab:orange", "tab:green"])
    one = report["one_by_one"]["req_per_s"]
    right.axhline(one, color="gray", linestyle=":", label="one by one")
    right.axhline(2 * one, color="gray", linestyle="--", label="2x one by one")
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names)
    right.set_ylabel("requests / s")
    right.set_title(f"Throughput ({report['queries']} queries x {report['rounds']} rounds, "
                    f"{report['backend']} {report['graph_role']})")
    right.legend()
    fig.tight_layout()
    save_figure(fig, path)
