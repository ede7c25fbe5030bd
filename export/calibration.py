"""Calibration tensors: the project's corpus, tokenised with its prompts, as graph inputs.

Calibration must see what the device will feed the graph: real prompt+text
token rows, padded single texts AND packed groups of short texts, for every
bucket, with lengths spread up to the bucket. Inputs are built by the same
host code the device runs (tokenizer, table, ``bucket_inputs``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.datasets import load_calibration_corpus
from gemma_edge.device.embedder import bucket_feed, document_text
from gemma_edge.device.packing import pack_greedy


def corpus_token_ids(embedder: Any, rows: Optional[Sequence[dict[str, Any]]] = None
                     ) -> list[list[int]]:
    """Token ids (prompt + text, BOS/EOS) of every corpus text, truncated to the largest bucket."""
    rows = list(rows if rows is not None else load_calibration_corpus())
    texts = []
    for row in rows:
        if row["prompt"] == "document":
            texts.append(document_text(row["text"], row.get("title")))
        else:
            texts.append(embedder.prompts.get(row["prompt"], "") + row["text"])
    ids, _ = embedder.tokenizer.encode(texts, embedder.max_tokens)
    return ids


def bucket_samples(embedder: Any, token_ids: Sequence[Sequence[int]], seq_len: int,
                   count: int, seed: int = 0, ladder: Optional[Sequence[int]] = None
                   ) -> list[dict[str, np.ndarray]]:
    """``count`` input dicts for one bucket: half single texts, half packed groups.

    Single texts are longer than the next smaller bucket of ``ladder`` (default: the
    float export's buckets 16..512, so 33-64 tokens for the 64-token bucket). The
    Edge TPU segments' own ladder (64, 128, 256) would calibrate the 64-token segments
    on texts of 1-64 tokens, the ones they serve; that was measured worse (mostly
    padding rows, docs/quantization.md), so the export keeps the default.
    """
    rng = random.Random(seed + seq_len)
    singles, longer = bucket_texts(token_ids, seq_len, ladder or embedder.buckets)
    if len(singles) < count:  # too few texts of this size: add longer ones cut to the bucket
        singles += longer[:count - len(singles)]
    short = [ids for ids in token_ids if len(ids) <= seq_len // 2]
    samples: list[dict[str, np.ndarray]] = []
    n_single = count - count // 2 if short else count
    for ids in rng.sample(singles, min(n_single, len(singles))):
        samples.append(text_inputs(embedder, [ids], seq_len))
    while len(samples) < count and short:
        group = rng.sample(short, min(len(short), embedder.slots * 2))
        bins = pack_greedy([len(g) for g in group], seq_len, embedder.slots)
        samples.append(text_inputs(embedder, [group[i] for i in bins[0]], seq_len))
    while len(samples) < count and singles:
        samples.append(text_inputs(embedder, [rng.choice(singles)], seq_len))
    return samples


def cut_to_bucket(ids: Sequence[int], seq_len: int) -> list[int]:
    """Token ids cut to ``seq_len`` as the device cuts a longer text: the final EOS kept."""
    return list(ids) if len(ids) <= seq_len else list(ids[:seq_len - 1]) + [ids[-1]]


def bucket_texts(token_ids: Sequence[Sequence[int]], seq_len: int, ladder: Sequence[int]
                 ) -> tuple[list[Sequence[int]], list[list[int]]]:
    """(the texts the ``seq_len`` bucket serves: longer than the next smaller bucket of
    ``ladder``; the longer texts, cut to the bucket)."""
    lower = max((b for b in ladder if b < seq_len), default=0)
    return ([ids for ids in token_ids if lower < len(ids) <= seq_len],
            [cut_to_bucket(ids, seq_len) for ids in token_ids if len(ids) > seq_len])


def text_inputs(host: Any, group: Sequence[Sequence[int]], seq_len: int
                ) -> dict[str, np.ndarray]:
    """One graph-input dict (embeddings, mask, pool) for the texts ``group`` (token ids)
    in one ``seq_len`` bucket, built as the device builds it (``device.embedder.bucket_feed``);
    ``host``: an Embedder or a ``TextHost``."""
    rows, mask, pool = bucket_feed(host.table, group, seq_len, host.hidden, host.slots)
    return {"embeddings": rows, "mask": mask, "pool": pool}


@dataclass
class TextHost:
    """The host side of an Embedder that calibration uses (prompts, tokenizer, table,
    buckets, pooling slots), built from an export's tokenizer and table before any graph
    exists: the export starts its Edge TPU segments before it converts the float graph."""

    prompts: dict[str, str]
    tokenizer: Any
    table: Any
    buckets: list[int]
    hidden: int
    slots: int

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    @classmethod
    def from_parts(cls, art_dir: Path, prompts: dict[str, str], tokenizer_spec: dict[str, Any],
                   table_spec: dict[str, Any], buckets: Sequence[int], hidden: int,
                   slots: int) -> TextHost:
        from gemma_edge.device.table import EmbeddingTable
        from gemma_edge.device.tokenizer import TextTokenizer

        return cls(dict(prompts), TextTokenizer(art_dir, tokenizer_spec),
                   EmbeddingTable(art_dir, table_spec), sorted(int(b) for b in buckets),
                   int(hidden), int(slots))


def calibration_set(art_dir: Path, buckets: Sequence[int], per_bucket: int,
                    rows: Optional[Sequence[dict[str, Any]]] = None,
                    ladder: Optional[Sequence[int]] = None
                    ) -> dict[int, list[dict[str, np.ndarray]]]:
    """{bucket: [inputs...]} from the float export in ``art_dir`` (``ladder``: see
    ``bucket_samples``)."""
    from gemma_edge.device import Embedder

    return calibration_from(Embedder(art_dir, backend="cpu", precision="float"), buckets,
                            per_bucket, rows, ladder)


def calibration_from(host: Any, buckets: Sequence[int], per_bucket: int,
                     rows: Optional[Sequence[dict[str, Any]]] = None,
                     ladder: Optional[Sequence[int]] = None
                     ) -> dict[int, list[dict[str, np.ndarray]]]:
    """{bucket: [inputs...]} through ``host``: an Embedder (float) or a ``TextHost``."""
    ids = corpus_token_ids(host, rows)
    return {t: bucket_samples(host, ids, t, per_bucket, ladder=ladder) for t in buckets}


def write_calibration(art_dir: Path, out_dir: Path, per_bucket: int) -> dict[int, Path]:
    """``make calibration``: one ``calibration_<T>.npz`` per bucket (embeddings, mask, pool)."""
    from gemma_edge.atomic_files import atomic_write_npz
    from gemma_edge.manifest import load_manifest

    buckets = load_manifest(art_dir)["buckets"]
    written = {}
    for seq_len, samples in calibration_set(art_dir, buckets, per_bucket).items():
        arrays = {key: np.concatenate([s[key] for s in samples]) for key in samples[0]}
        path = Path(out_dir) / f"calibration_{seq_len}.npz"
        atomic_write_npz(path, arrays, compressed=True)
        written[seq_len] = path
        print(f"{path}: {len(samples)} samples "
              + ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items()))
    return written


def register(sub: Any) -> None:
    p = sub.add_parser("calibration", help="corpus -> calibration tensors for every bucket")
    p.add_argument("--artifacts", required=True, type=Path,
                   help="an export (its tokenizer, table and buckets are used)")
    p.add_argument("--out", type=Path, default=Path("build/calibration"))
    p.add_argument("--per-bucket", type=int, default=64)
    p.set_defaults(func=lambda a: (write_calibration(a.artifacts, a.out, a.per_bucket), 0)[1])
