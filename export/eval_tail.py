"""The tail of ``gemma-edge eval``: short everyday sentences, and the check on the minimum.

Mean cosines hide what a user notices: one text whose embedding lands next to the wrong
neighbour. Issue 20 found the fully int8 graphs' worst texts among short everyday
sentences (13-27 tokens with the prompt) in Arabic, Turkish, Swahili, Vietnamese, Polish,
Hindi and Japanese, which the retrieval set is too long to contain. This module reports
the held-out short sentences (``calibration_data/heldout/short.jsonl``) per language and
per length band, lists the worst ones, and sums every held-out text of a precision into
one tail figure per Matryoshka dimension: its minimum, how many fall below the target,
and a status the export writes into the manifest and ``gemma-edge eval --fail-below``
turns into an exit code.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .metrics import LENGTH_BANDS, cosine_summary, grouped_summary, length_band

TAIL_TARGET = 0.97  # issue 20: every held-out text within this cosine of float
WORST = 10
BAND_ORDER = [length_band(low) for low, _ in LENGTH_BANDS]


def select_short(rows: Sequence[dict[str, Any]], every: int = 1) -> list[dict[str, Any]]:
    """Every ``every``-th sentence of each language (all of them for 1): a subset that
    keeps every language, for callers with a time budget."""
    if every < 1:
        raise ValueError(f"every={every}: at least 1")
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        k = seen.get(row["lang"], 0)
        seen[row["lang"]] = k + 1
        if k % every == 0:
            out.append(row)
    return out


def short_entry(cos: np.ndarray, rows: Sequence[dict[str, Any]], tokens: Sequence[int],
                threshold: float, worst: int = WORST) -> dict[str, Any]:
    """One precision, prompt and dimension: the short sentences' cosines summed up
    overall, per language and per token band (prompt included), the ``worst`` lowest
    texts, and every cosine (id order) for plots and later comparison."""
    cos = np.asarray(cos, dtype=np.float64)
    bands = [length_band(n) for n in tokens]
    per_band = grouped_summary(cos, bands, threshold)
    # NaN sorts last in argsort; a NaN text is the worst of all, so it goes first.
    order = sorted(range(len(cos)), key=lambda i: (not math.isnan(cos[i]), cos[i]))
    return {
        "all": cosine_summary(cos, threshold),
        "per_language": grouped_summary(cos, [r["lang"] for r in rows], threshold),
        "per_band": {b: per_band[b] for b in BAND_ORDER if b in per_band},
        "worst": [{"id": rows[i]["id"], "lang": rows[i]["lang"], "tokens": int(tokens[i]),
                   "cosine": float(cos[i]), "text": rows[i]["text"]} for i in order[:worst]],
        "cosines": [round(float(c), 6) for c in cos],
    }


def tail_summary(parts: dict[str, dict[int, list[np.ndarray]]], threshold: float
                 ) -> dict[str, dict[str, Any]]:
    """Per precision: the minimum cosine over all its held-out texts at each dimension,
    how many are below ``threshold`` (``below``: the most at any dimension), and "ok"
    only when every dimension's minimum is at least the threshold (``not min >=
    threshold`` fails, so NaN fails)."""
    out: dict[str, dict[str, Any]] = {}
    for precision, per_dim in parts.items():
        dims = {}
        for dim, arrays in sorted(per_dim.items()):
            cos = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays])
            stats = cosine_summary(cos, threshold)
            dims[str(dim)] = {"min": stats["min"], "below": stats["below"], "texts": stats["n"]}
        mins = [d["min"] for d in dims.values()]
        ok = all(m >= threshold for m in mins)
        out[precision] = {"threshold": threshold,
                          "min": float("nan") if any(math.isnan(m) for m in mins) else min(mins),
                          "below": max(d["below"] for d in dims.values()),
                          "status": "ok" if ok else "below target", "per_dim": dims}
    return out


def tail_failures(tail: Optional[dict[str, Any]], threshold: Optional[float] = None) -> list[str]:
    """One line per precision whose held-out minimum is below ``threshold`` (default: the
    threshold the tail was computed with) at any dimension; NaN fails."""
    lines = []
    for precision, t in (tail or {}).items():
        if not isinstance(t, dict) or "per_dim" not in t:
            continue
        limit = t["threshold"] if threshold is None else threshold
        low = {dim: d["min"] for dim, d in t["per_dim"].items() if not d["min"] >= limit}
        if low:
            worst = ", ".join(f"{dim}-d {m:.4f}" for dim, m in low.items())
            texts = max(d["texts"] for d in t["per_dim"].values())
            lines.append(f"{precision}: held-out minimum cosine to float below {limit:g} "
                         f"({worst}; up to {t['below']} of {texts} texts under "
                         f"{t['threshold']:g})")
    return lines


def tail_warnings(evaluation: Optional[dict[str, Any]]) -> list[str]:
    """The loud lines the export prints when its quick evaluation's tail misses the target."""
    tail = (evaluation or {}).get("tail") if isinstance(evaluation, dict) else None
    return [f"WARNING: {line}; see manifest.json evaluation.tail and `gemma-edge eval`"
            for line in tail_failures(tail)]


def manifest_short(short: dict[str, Any]) -> dict[str, Any]:
    """The short-sentence figures the manifest keeps: overall and per language at each
    dimension, and the worst five texts at the full dimension (no per-text cosines)."""
    out: dict[str, Any] = {k: short[k] for k in ("texts", "every", "prompts", "threshold")}
    out["seconds"] = {k: round(v, 1) for k, v in short.get("seconds", {}).items()}
    out["precisions"] = {}
    for precision, per_prompt in short["precisions"].items():
        out["precisions"][precision] = {}
        for prompt, per_dim in per_prompt.items():
            first = next(iter(per_dim))
            out["precisions"][precision][prompt] = {
                dim: {"all": e["all"],
                      "per_language": {lang: {k: s[k] for k in ("mean", "min", "below")}
                                       for lang, s in e["per_language"].items()},
                      **({"worst": [{k: w[k] for k in ("id", "lang", "tokens", "cosine")}
                                    for w in e["worst"][:5]]} if dim == first else {})}
                for dim, e in per_dim.items()}
    return out


def print_short(report: dict[str, Any]) -> None:
    """Per language and per band at the first (full) dimension; one line for the others."""
    short = report.get("short")
    if not short:
        return
    t = short["threshold"]
    print(f"short sentences: {short['texts']} in {len(short['languages'])} languages "
          f"(every {short['every']}), prompts {', '.join(short['prompts'])}; "
          f"cosine to float sentence-transformers, below = under {t:g}")
    print("  seconds (embedding them, all prompts): " +
          ", ".join(f"{k} {v:.0f}" for k, v in short.get("seconds", {}).items()))
    for precision, per_prompt in short["precisions"].items():
        for prompt, per_dim in per_prompt.items():
            dims = list(per_dim)
            e = per_dim[dims[0]]
            print(f"  {precision} / {prompt} prompt @ {dims[0]}:")
            print(f"    {'group':<8} {'n':>4} {'mean':>7} {'min':>7} {'p1':>7} {'below':>5}")
            groups = [("all", e["all"])] + list(e["per_language"].items()) + \
                [(f"{b} tok", s) for b, s in e["per_band"].items()]
            for name, s in groups:
                print(f"    {name:<8} {s['n']:>4} {s['mean']:7.4f} {s['min']:7.4f} "
                      f"{s['p1']:7.4f} {s['below']:>5}")
            for dim in dims[1:]:
                s = per_dim[dim]["all"]
                print(f"    @ {dim:>4}: mean {s['mean']:.4f} min {s['min']:.4f} "
                      f"p1 {s['p1']:.4f} below {s['below']}")
            print(f"    worst at {dims[0]}:")
            for w in e["worst"]:
                print(f"      {w['cosine']:.4f} {w['lang']} {w['tokens']:>3} tok {w['id']}: "
                      f"{w['text']}")


def print_tail(report: dict[str, Any]) -> None:
    for precision, t in (report.get("tail") or {}).items():
        dims = ", ".join(f"{dim}-d {d['min']:.4f} ({d['below']} below)"
                         for dim, d in t["per_dim"].items())
        print(f"tail {precision}: {t['status'].upper()} - held-out minimum per dimension "
              f"(target {t['threshold']:g}, {next(iter(t['per_dim'].values()))['texts']} "
              f"texts): {dims}")


def plot_short(ax: Any, report: dict[str, Any]) -> None:
    """Strip plot: every short sentence's cosine per language, one colour per precision
    (first prompt, full dimension), the target as a dashed line."""
    short = report["short"]
    langs = sorted(short["languages"])
    precisions = list(short["precisions"])
    width = 0.8 / max(1, len(precisions))
    rng = np.random.default_rng(0)
    for k, precision in enumerate(precisions):
        per_prompt = short["precisions"][precision]
        per_dim = per_prompt[short["prompts"][0]]
        cos = np.asarray(per_dim[next(iter(per_dim))]["cosines"])
        lang_of = short["langs"]
        for j, lang in enumerate(langs):
            ys = cos[[i for i, x in enumerate(lang_of) if x == lang]]
            xs = j - 0.4 + width * (k + 0.5) + rng.uniform(-width / 3, width / 3, len(ys))
            ax.scatter(xs, ys, s=4, alpha=0.5, color=f"C{k}", label=precision if j == 0 else None)
    ax.axhline(short["threshold"], color="k", linestyle="--", linewidth=0.8,
               label=f"target {short['threshold']:g}")
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs)
    ax.set_ylabel("cosine to float")
    ax.set_title(f"short held-out sentences ({short['prompts'][0]} prompt, full dimension)")
    ax.legend(loc="lower left", markerscale=3)


# The export's quick evaluation: every short sentence, with the document prompt only
# (how a user's notes are embedded; issue 20's tail was sentences embedded as texts).
# They are 16-34 tokens: the full-int8 segments pack three into one 64-token run, about
# 400 runs for all 1,216 (the 64-token segments: ~0.17 s a run on this machine's CPU),
# while the float reference embeds them beside it; `gemma-edge eval` adds the query prompt.
QUICK_SHORT_PROMPTS = ("document",)
QUICK_SHORT_EVERY = 1


def quick_tail(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``evaluation.tail`` (per precision: minimum, count below, status
    at every Matryoshka dim) and ``evaluation.short`` (compact) from an eval report."""
    out: dict[str, Any] = {"tail": report["tail"]}
    if report.get("short"):
        out["short"] = manifest_short(report["short"])
    return out
