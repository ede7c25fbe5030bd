"""The host-side token-embedding table, read row by row from disk.

262144 x 768 rows are 805 MB in float32: the device must not hold them in RAM.
Two stored forms:
- ``float16`` rows (403 MB on disk) for the float path: the raw weights are small
  (|w| < 1) so fp16 storage costs < 1e-6 in cosine; activations stay float32;
- ``int8`` rows with one float32 scale per row (202 MB) for the int8 paths.

Rows are read with ``os.pread`` (one call per distinct token), not through a memory
map. Why: on current Linux kernels the page cache holds large folios and a fault in a
file mapping maps the whole folio, so looking up the 14 rows of a short query through
the mapping made 17 MB resident (measured: the transient that set the int8 bench's
peak RSS), even with the pages released after each lookup. pread copies just the rows
and maps nothing; the file still sits in the OS page cache, shared and reclaimable.
A 512-token text costs ~1 ms of syscalls. Where ``os.pread`` is missing (Windows) the
file is memory-mapped instead. numpy has no scattered-row file read, hence this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gemma_edge.errors import ArtifactError


class _RowFile:
    """A C-ordered .npy array on disk whose rows (first axis) are read on demand."""

    def __init__(self, path: Path):
        self.path, self._fd = path, -1
        with open(path, "rb") as f:
            fmt = np.lib.format
            read_header = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                           else fmt.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject or not shape:
            raise ValueError("expected a C-ordered numeric array")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        needed = self.offset + self.shape[0] * self.row_bytes
        if os.path.getsize(path) < needed:
            raise ValueError(f"file holds {os.path.getsize(path)} bytes, its header says "
                             f"{needed}: truncated")
        self._mapped = None
        if hasattr(os, "pread"):
            self._fd = os.open(path, os.O_RDONLY)
        else:
            self._mapped = np.load(path, mmap_mode="r")

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (int64, in range, each once: one read per id) as a new array."""
        if self._mapped is not None:
            return np.array(self._mapped[ids])
        chunks = [os.pread(self._fd, self.row_bytes, self.offset + int(i) * self.row_bytes)
                  for i in ids]
        if any(len(c) != self.row_bytes for c in chunks):
            raise ArtifactError(f"{self.path}: short read; the file changed or is damaged, "
                                "copy the artifacts again")
        rows = np.frombuffer(b"".join(chunks), dtype=self.dtype)
        return rows.reshape((len(ids),) + self.shape[1:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class EmbeddingTable:
    def __init__(self, art_dir: Path, spec: dict[str, Any]):
        art_dir = Path(art_dir)
        try:
            self.rows = _RowFile(art_dir / spec["path"])
            self.scales = _RowFile(art_dir / spec["scales"]) if spec.get("scales") else None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{art_dir / spec['path']}: cannot read the embedding table "
                                f"({exc}); the artifacts are corrupted, copy them again") from exc
        if len(self.rows.shape) != 2:
            raise ArtifactError(f"{art_dir / spec['path']}: expected a 2-D table")
        self.vocab_size, self.dim = self.rows.shape
        if self.scales is not None and self.scales.shape != (self.vocab_size,):
            raise ArtifactError(f"{art_dir / spec['scales']}: {self.scales.shape} scales for "
                                f"{self.vocab_size} rows; re-export")

    def lookup(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), dim]."""
        index = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not index.size:
            return np.zeros((0, self.dim), dtype=np.float32)
        if index.min() < 0 or index.max() >= self.vocab_size:
            raise ArtifactError(f"token id {int(index.max())} outside the table "
                                f"({self.vocab_size} rows): tokenizer and table do not match")
        # each distinct token is read once, then spread to its positions while still
        # 8/16-bit (gathering the float32 rows instead took twice as long at 512 tokens)
        unique, inverse = np.unique(index, return_inverse=True)
        inverse = inverse.reshape(-1)
        rows = self.rows.read(unique)[inverse].astype(np.float32)
        if self.scales is not None:
            rows *= self.scales.read(unique)[inverse].astype(np.float32)[:, None]
        finite = np.isfinite(rows).all(axis=1)  # written so that NaN fails it
        if not finite.all():
            bad = sorted({int(i) for i in index[~finite]})
            raise ArtifactError(f"{self.rows.path}: the rows of token ids {bad[:5]} hold NaN or "
                                "inf; the table is broken (e.g. exported from a checkpoint with "
                                "NaN weights): re-export from a healthy checkpoint")
        return rows


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: row = q * scale, |q| <= 127."""
    table = np.asarray(table, dtype=np.float32)
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32)
