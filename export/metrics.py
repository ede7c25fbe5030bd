"""Retrieval metrics over a query x document score matrix (Recall@k, MRR, nDCG@10).

Written out because the definitions are three lines each and the evaluation
must run with numpy alone; the formulas follow the BEIR / MTEB conventions
(binary relevance, log2 discount, MRR over the full ranking).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def rank_of_relevant(scores: np.ndarray, relevant: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each query, the 1-based ranks of its relevant documents."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(order.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, order.shape[1] + 1)[None, :]
    return [ranks[q, list(rel)] for q, rel in enumerate(relevant)]


def retrieval_metrics(scores: np.ndarray, relevant: Sequence[Sequence[int]],
                      k: int = 10) -> dict[str, float]:
    if scores.shape[0] != len(relevant):
        raise ValueError(f"{scores.shape[0]} score rows for {len(relevant)} queries")
    recall1, mrr, ndcg = [], [], []
    for ranks in rank_of_relevant(scores, relevant):
        best = int(ranks.min())
        recall1.append(float(best == 1))
        mrr.append(1.0 / best)
        gains = sum(1.0 / np.log2(r + 1) for r in ranks if r <= k)
        ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(ranks), k)))
        ndcg.append(gains / ideal)
    return {"recall@1": float(np.mean(recall1)), "mrr": float(np.mean(mrr)),
            f"ndcg@{k}": float(np.mean(ndcg)), "queries": len(recall1)}


def same_ranking_share(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Share of queries whose top-k document order is identical under both score matrices."""
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.all(top_a == top_b, axis=1)))


# -- the tail: cosine to float per group of texts ---------------------------------------
# Token bands (prompt included) for the per-length tables: finest where the short
# sentences are (16-34 tokens with the document prompt), then the device's buckets.
LENGTH_BANDS: tuple[tuple[int, Optional[int]], ...] = (
    (1, 16), (17, 20), (21, 24), (25, 32), (33, 64), (65, 128), (129, None))


def length_band(tokens: int) -> str:
    """The label of the band holding ``tokens`` ("<=16", "17-20", ..., ">128")."""
    for low, high in LENGTH_BANDS:
        if high is None:
            return f">{low - 1}"
        if tokens <= high:
            return f"<={high}" if low == 1 else f"{low}-{high}"
    raise AssertionError("unreachable: the last band is open")


def cosine_summary(cos: np.ndarray, threshold: float) -> dict[str, float]:
    """Mean, minimum, 1st percentile and how many fall below ``threshold``.

    NaN propagates into mean/min/p1 and counts as below (``not cos >= threshold``),
    so a broken graph can never pass a check built on these figures.
    """
    cos = np.asarray(cos, dtype=np.float64)
    if cos.size == 0:
        raise ValueError("no cosines to summarise")
    nan = bool(np.isnan(cos).any())
    return {"n": int(cos.size),
            "mean": float("nan") if nan else float(cos.mean()),
            "min": float("nan") if nan else float(cos.min()),
            "p1": float("nan") if nan else float(np.percentile(cos, 1)),
            "below": int(np.sum(~(cos >= threshold)))}


def grouped_summary(cos: np.ndarray, keys: Sequence[str], threshold: float
                    ) -> dict[str, dict[str, float]]:
    """``cosine_summary`` of each group of texts sharing a key, keys sorted."""
    cos = np.asarray(cos, dtype=np.float64)
    if len(keys) != cos.size:
        raise ValueError(f"{len(keys)} keys for {cos.size} cosines")
    out = {}
    for key in sorted(set(keys)):
        rows = [i for i, k in enumerate(keys) if k == key]
        out[key] = cosine_summary(cos[rows], threshold)
    return out
