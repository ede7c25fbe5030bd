"""Pure logic: retrieval metrics and bucket packing."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_edge.device.packing import bucket_inputs, pack_greedy, segment_ids
from gemma_edge.export.metrics import retrieval_metrics, same_ranking_share


def test_metrics_perfect_and_worst():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8]])
    perfect = retrieval_metrics(scores, [[0], [2]])
    assert perfect["recall@1"] == 1.0 and perfect["mrr"] == 1.0 and perfect["ndcg@10"] == 1.0
    worst = retrieval_metrics(scores, [[2], [1]])
    assert worst["recall@1"] == 0.0
    assert worst["mrr"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert worst["ndcg@10"] == pytest.approx(1 / np.log2(4))


def test_same_ranking_share():
    a = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    b = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    assert same_ranking_share(a, b, k=3) == 0.5


def test_bucket_inputs_block_diagonal():
    mask, pool = bucket_inputs([2, 3], 8, 4)
    assert mask.shape == (1, 8, 8) and pool.shape == (1, 4, 8)
    assert mask[0, 0, 1] == 1 and mask[0, 0, 2] == 0 and mask[0, 2, 4] == 1
    assert mask[0, 6, 7] == 1 and mask[0, 6, 0] == 0  # padding sees padding only
    assert pool[0].sum(axis=1).tolist() == [2, 3, 0, 0]
    assert segment_ids([2, 3], 8).tolist() == [0, 0, 1, 1, 1, -1, -1, -1]


def test_bucket_inputs_rejects_overflow():
    with pytest.raises(ValueError, match="do not fit"):
        bucket_inputs([5, 5], 8, 4)
    with pytest.raises(ValueError, match="slots"):
        bucket_inputs([1, 1, 1], 8, 2)
    with pytest.raises(ValueError, match="at least one token"):
        bucket_inputs([0], 8, 2)


def test_pack_greedy_respects_limits():
    lengths = [5, 3, 3, 2, 7, 1, 1, 1]
    bins = pack_greedy(lengths, 8, 3)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 8 and len(b) <= 3
    assert len(bins) <= 4
    with pytest.raises(ValueError, match="more than the bucket"):
        pack_greedy([9], 8, 2)
