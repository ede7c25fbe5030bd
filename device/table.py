"""The host-side token-embedding table, memory-mapped from disk.

262144 x 768 rows are 805 MB in float32: the device must not hold them in RAM.
``np.load(mmap_mode="r")`` maps the file, so a lookup touches only the pages of
the rows it reads (a 4 KiB page holds 2-5 rows). Two stored forms:
- ``float16`` rows (403 MB on disk) for the float path: the raw weights are small
  (|w| < 1) so fp16 storage costs < 1e-6 in cosine; activations stay float32;
- ``int8`` rows with one float32 scale per row (202 MB) for the int8 paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gemma_edge.errors import ArtifactError


class EmbeddingTable:
    def __init__(self, art_dir: Path, spec: dict[str, Any]):
        art_dir = Path(art_dir)
        try:
            self.rows = np.load(art_dir / spec["path"], mmap_mode="r")
            self.scales = (np.load(art_dir / spec["scales"], mmap_mode="r")
                           if spec.get("scales") else None)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{art_dir / spec['path']}: cannot map the embedding table "
                                f"({exc}); the artifacts are corrupted, copy them again") from exc
        if self.rows.ndim != 2:
            raise ArtifactError(f"{art_dir / spec['path']}: expected a 2-D table")
        self.vocab_size, self.dim = self.rows.shape

    def lookup(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), dim]."""
        index = np.asarray(ids, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.vocab_size):
            raise ArtifactError(f"token id {int(index.max())} outside the table "
                                f"({self.vocab_size} rows): tokenizer and table do not match")
        rows = np.asarray(self.rows[index], dtype=np.float32)
        if self.scales is not None:
            rows *= np.asarray(self.scales[index], dtype=np.float32)[:, None]
        return rows


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: row = q * scale, |q| <= 127."""
    table = np.asarray(table, dtype=np.float32)
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32)
