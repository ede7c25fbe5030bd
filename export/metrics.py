"""Retrieval metrics over a query x document score matrix (Recall@k, MRR, nDCG@10).

Written out because the definitions are three lines each and the evaluation
must run with numpy alone; the formulas follow the BEIR / MTEB conventions
(binary relevance, log2 discount, MRR over the full ranking).
"""

from __future__ import annotations

from typing import Sequence

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
