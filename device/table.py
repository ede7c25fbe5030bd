"""The host-side token-embedding table, memory-mapped from disk.

262144 x 768 rows are 805 MB in float32: the device must not hold them in RAM.
The .npy file is memory-mapped (read-only, our own ``mmap`` so that it can be
advised), so a lookup touches only the pages of the rows it reads (a 4 KiB page
holds 2-5 rows). Two stored forms:
- ``float16`` rows (403 MB on disk) for the float path: the raw weights are small
  (|w| < 1) so fp16 storage costs < 1e-6 in cosine; activations stay float32;
- ``int8`` rows with one float32 scale per row (202 MB) for the int8 paths.

After each lookup the mapping's pages are released (MADV_DONTNEED where Python
has ``mmap.madvise``): the rows stay in the OS page cache, shared and
reclaimable, instead of adding up to ~200 MB to the process's resident set as a
large indexing job touches more of the vocabulary.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.errors import ArtifactError


class EmbeddingTable:
    def __init__(self, art_dir: Path, spec: dict[str, Any]):
        art_dir = Path(art_dir)
        self._maps: list[mmap.mmap] = []
        try:
            self.rows = self._map(art_dir / spec["path"])
            self.scales = self._map(art_dir / spec["scales"]) if spec.get("scales") else None
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
        self.release()
        return rows

    def _map(self, path: Path) -> np.ndarray:
        """A read-only array over the .npy file's data, through our own mmap (to madvise it)."""
        with open(path, "rb") as f:
            fmt = np.lib.format
            read_header = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                           else fmt.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if fortran or dtype.hasobject:
            raise ValueError("expected a C-ordered numeric array")
        self._maps.append(mapped)
        count = int(np.prod(shape)) if shape else 1
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)

    def release(self) -> None:
        """Drop the table's resident pages from this process (they stay in the page cache)."""
        for mapped in self._maps:
            advise: Optional[Any] = getattr(mapped, "madvise", None)  # Python >= 3.8, Unix
            if advise is not None and hasattr(mmap, "MADV_DONTNEED"):
                advise(mmap.MADV_DONTNEED)


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: row = q * scale, |q| <= 127."""
    table = np.asarray(table, dtype=np.float32)
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32)
