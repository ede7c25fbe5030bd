"""Indexing a folder into a ``VectorStore`` and opening stores for queries.

Split from store.py (the SQLite schema and k-NN) so each file has one job: this
one walks files, decides what changed, chunks, embeds in batches and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from gemma_edge.errors import InputError

from .chunking import DEFAULT_GLOBS, Chunk, Chunker, SkipFile, iter_files, load_text_file
from .store import FileState, VectorStore

log = logging.getLogger("gemma_edge.device")

def read_store_meta(path: Path) -> dict[str, str]:
    """The meta table of an existing index ({} when the file does not exist)."""
    if not Path(path).is_file():
        return {}
    with contextlib.closing(VectorStore(path, use_vec=False)) as store:
        return dict(store.meta)


def _check_dim(embedder: Any, dim: int) -> int:
    if int(dim) not in [int(d) for d in embedder.mrl_dims]:
        raise InputError(f"--dim {dim}: the model's Matryoshka dims are "
                         f"{', '.join(str(d) for d in embedder.mrl_dims)}")
    return int(dim)


def open_for_query(db: Path, embedder: Any, dim: Optional[int] = None,
                   use_vec: Optional[bool] = None) -> VectorStore:
    """An existing index, checked against the embedder; ``dim`` defaults to the index's."""
    db = Path(db)
    if not db.is_file():
        raise InputError(f"{db}: no search index here; build one with `gemma-edge search "
                         "index DIR` (or pass --db)")
    store = VectorStore(db, use_vec=use_vec)
    try:
        if not store.meta:
            raise InputError(f"{db}: empty file, not a search index; re-index with --rebuild")
        store.check_compatible(embedder.artifact_id, store.dim if dim is None else dim)
    except BaseException:
        store.close()
        raise
    return store


@contextlib.contextmanager
def open_for_indexing(db: Path, embedder: Any, dim: Optional[int] = None,
                      rebuild: bool = False, use_vec: Optional[bool] = None
                      ) -> Iterator[VectorStore]:
    """The index to update in place, or a fresh one that replaces ``db`` on success.

    A new or rebuilt index is written to a hidden file beside ``db`` and renamed
    over it only when indexing succeeded, so ``--rebuild`` that fails keeps the old one.
    """
    db = Path(db)
    meta = read_store_meta(db)
    if meta and not rebuild:
        if dim is not None:
            _check_dim(embedder, dim)
        with contextlib.closing(open_for_query(db, embedder, dim, use_vec)) as store:
            yield store
        return
    dim = _check_dim(embedder, embedder.output_dim if dim is None else dim)
    tmp = db.with_name(f".{db.name}.new")
    _remove(tmp)
    store = VectorStore(tmp, use_vec=use_vec)
    try:
        with store.transaction():
            store.initialise(embedder.artifact_id, dim, embedder.output_dim)
        yield store
        store.close()
        _remove(db.with_name(db.name + "-journal"))  # a hot journal would corrupt the new file
        os.replace(str(tmp), str(db))
    except BaseException:
        store.close()
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    for name in (path, path.with_name(path.name + "-journal")):
        if name.exists():
            name.unlink()


# -- indexing ------------------------------------------------------------------------------
@dataclass
class IndexReport:
    """What one index run did (for the CLI summary and tests)."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0
    chunks_embedded: int = 0
    seconds: float = 0.0


def index_directory(store: VectorStore, embedder: Any, root: Path,
                    globs: Sequence[str] = DEFAULT_GLOBS, chunker: Optional[Chunker] = None,
                    batch_size: int = 16, progress: Optional[Callable[[int, int], None]] = None
                    ) -> IndexReport:
    """Bring ``store`` in line with the files under ``root``, in one transaction.

    Only new and changed files are chunked and embedded (unchanged = same mtime and
    size, or same SHA-256); files gone from ``root`` are removed. ``progress(done,
    total)`` is called after each batch of chunks.
    """
    started = time.monotonic()
    root = Path(root)
    chunker = chunker or Chunker(embedder)
    settings = json.dumps(chunker.settings, sort_keys=True)
    force = store.meta.get("chunking") != settings  # new chunk boundaries: re-embed all
    known = store.files()
    report = IndexReport()
    jobs: list[tuple[str, FileState, list[Chunk]]] = []
    touched: list[tuple[str, FileState]] = []
    seen: set[str] = set()
    for path, rel in iter_files(root, globs, exclude=[store.path]):
        stat = path.stat()
        old = known.get(rel)
        if (old is not None and not force and old.mtime_ns == stat.st_mtime_ns
                and old.size == stat.st_size):
            seen.add(rel)
            report.unchanged += 1
            continue
        try:
            text, data = load_text_file(path, chunker.max_file_bytes)
        except SkipFile as exc:
            log.info("skipped %s: %s", rel, exc)
            report.skipped[rel] = str(exc)
            continue
        seen.add(rel)
        state = FileState(stat.st_mtime_ns, len(data), hashlib.sha256(data).hexdigest())
        if old is not None and not force and old.sha256 == state.sha256:
            touched.append((rel, state))
            report.unchanged += 1
            continue
        (report.added if old is None else report.changed).append(rel)
        jobs.append((rel, state, chunker.chunk_text(text, rel)))
    report.removed = sorted(set(known) - seen)
    with store.transaction():
        for rel in report.removed:
            store.delete_file(rel)
        for rel, state in touched:
            store.touch_file(rel, state)
        report.chunks_embedded = _embed_jobs(store, embedder, jobs, batch_size, progress)
        store.set_meta(chunking=settings, root=str(root.resolve()),
                       indexed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        store.sync_vec_index()
    report.seconds = time.monotonic() - started
    return report


def _embed_jobs(store: VectorStore, embedder: Any, jobs: list[tuple[str, FileState, list[Chunk]]],
                batch_size: int, progress: Optional[Callable[[int, int], None]]) -> int:
    """Embed chunks in batches across files; write each file as soon as it is complete."""
    flat = [(j, i) for j, job in enumerate(jobs) for i in range(len(job[2]))]
    pending: dict[int, np.ndarray] = {}
    written = 0

    def write_upto(stop: int) -> None:
        nonlocal written
        while written < stop:
            rel, state, chunks = jobs[written]
            empty = np.zeros((0, store.dim), dtype=np.float32)
            store.put_file(rel, state, chunks, pending.pop(written, empty))
            written += 1

    for start in range(0, len(flat), max(1, batch_size)):
        batch = flat[start:start + max(1, batch_size)]
        chunks = [jobs[j][2][i] for j, i in batch]
        out = embedder.encode_document([c.text for c in chunks], dim=store.dim,
                                       title=[c.title for c in chunks])
        for (j, i), row in zip(batch, out):
            if j not in pending:
                pending[j] = np.zeros((len(jobs[j][2]), store.dim), dtype=np.float32)
            pending[j][i] = row
        j, i = batch[-1]
        write_upto(j + 1 if i == len(jobs[j][2]) - 1 else j)
        if progress is not None:
            progress(start + len(batch), len(flat))
    write_upto(len(jobs))
    return len(flat)
