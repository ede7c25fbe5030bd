"""Graph inputs for one bucket: the visibility mask and the pooling matrix.

Both are numpy-only so the device and the export verification build them the
same way. A bucket holds one text (padded) or several short texts packed end
to end; attention is block-diagonal so packed texts never see each other, and
each text gets its own pooling row. RoPE depends only on the distance i - j, so
a text's result does not depend on where in the bucket it sits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def segment_ids(lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """Per-position segment index (0..n-1), -1 for padding."""
    total = int(sum(lengths))
    if total > seq_len:
        raise ValueError(f"{total} tokens do not fit a bucket of {seq_len}")
    seg = np.full(seq_len, -1, dtype=np.int32)
    start = 0
    for i, n in enumerate(lengths):
        seg[start:start + n] = i
        start += n
    return seg


def bucket_inputs(lengths: Sequence[int], seq_len: int, slots: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """mask [1, T, T] and pool [1, S, T] (float32, 0/1) for texts of ``lengths`` tokens.

    Padding positions attend to padding only, so no softmax row is empty; they
    are never pooled, so they do not touch the result.
    """
    if len(lengths) > slots:
        raise ValueError(f"{len(lengths)} texts exceed the graph's {slots} pooling slots")
    if any(n <= 0 for n in lengths):
        raise ValueError("every text needs at least one token")
    seg = segment_ids(lengths, seq_len)
    mask = (seg[:, None] == seg[None, :]).astype(np.float32)[None]
    pool = (np.arange(slots, dtype=np.int32)[:, None] == seg[None, :]).astype(np.float32)[None]
    return mask, pool


def pack_greedy(lengths: Sequence[int], seq_len: int, slots: int) -> list[list[int]]:
    """Group text indices into buckets of ``seq_len`` (first-fit decreasing).

    Returns lists of indices; each group's lengths sum to <= seq_len and count <= slots.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"text {i} has {n} tokens, more than the bucket's {seq_len}")
        for b, free in enumerate(room):
            if n <= free and len(bins[b]) < slots:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    return bins
