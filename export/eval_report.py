"""The printed report and the chart of ``gemma-edge eval`` (evaluate.py measures).

Kept apart from the measurements as device/bench_report.py is for the bench: the
report dict is the interface, so this reads it and never runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .eval_tail import plot_short, print_short, print_tail


def print_report(report: dict[str, Any]) -> None:
    """The held-out set and the seconds, one line per precision and dim (cosine, MRR, R@1,
    nDCG@10, same top-10), then the short sentences and the tail (eval_tail)."""
    print(f"held-out set: {report['queries']} queries, {report['documents']} documents")
    if report.get("seconds"):
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    for precision, per_dim in report["precisions"].items():
        for dim, e in per_dim.items():
            c, r, o = e["cosine"], e["reference"], e["ours"]
            print(f"{precision:>9} @ {dim:>4}: cosine mean {c['mean']:.4f} min {c['min']:.4f} "
                  f"p1 {c['p1']:.4f} | MRR {o['mrr']:.4f} (float ST {r['mrr']:.4f}, "
                  f"delta {e['mrr_delta']:+.4f}) R@1 {o['recall@1']:.3f} "
                  f"nDCG@10 {o['ndcg@10']:.4f} | same top-10 {e['same_top10_order']:.2f}")
            same = e.get("cosine_same_tokens")
            if same:
                print(f"{'':>17} against float on the same {same['max_tokens']} tokens "
                      f"({same['truncated_texts']} texts cut): cosine mean {same['mean']:.4f} "
                      f"min {same['min']:.4f} p1 {same['p1']:.4f}")
    print_short(report)
    print_tail(report)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """MRR and min cosine per Matryoshka dim, one line per precision (and the short
    sentences per language below when the report has them), as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gemma_edge.reporting import save_figure

    if report.get("short"):  # the short sentences per language below the two panels
        fig = plt.figure(figsize=(12, 8))
        grid = fig.add_gridspec(2, 2)
        left, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        plot_short(fig.add_subplot(grid[1, :]), report)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for precision, per_dim in report["precisions"].items():
        dims = [int(d) for d in per_dim]
        left.plot(dims, [per_dim[str(d)]["ours"]["mrr"] for d in dims], "o-", label=precision)
        right.plot(dims, [per_dim[str(d)]["cosine"]["min"] for d in dims], "o-", label=precision)
        same = [per_dim[str(d)].get("cosine_same_tokens") for d in dims]
        if all(same):
            right.plot(dims, [x["min"] for x in same], "o:",  # type: ignore[index]
                       label=f"{precision}, float cut at {same[0]['max_tokens']} tokens")  # type: ignore[index]
    any_prec = next(iter(report["precisions"].values()), {})
    dims = [int(d) for d in any_prec]
    if dims:
        left.plot(dims, [any_prec[str(d)]["reference"]["mrr"] for d in dims], "k--",
                  label="float sentence-transformers")
    for ax, title in ((left, "MRR on held-out retrieval"), (right, "min cosine to float")):
        ax.set_xlabel("Matryoshka dimension")
        ax.set_title(title)
        ax.invert_xaxis()
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
