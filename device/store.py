"""The search index: files, chunks and their vectors in ONE SQLite file.

Why SQLite: it ships with Python (also the Dev Board's 3.7), is one file you can
copy between a laptop and a board, and gives real transactions: an index run is
one transaction, so a crash or Ctrl-C mid-index leaves the previous index intact.

Vectors are stored twice, on purpose:
- ``vectors``: float32 BLOBs, the source of truth, readable by any Python;
- ``vec_chunks``: a sqlite-vec ``vec0`` table (cosine distance) used for k-NN when
  the ``sqlite_vec`` module loads. It is a derived index: when sqlite-vec is
  missing the store falls back to an exact numpy scan of the BLOBs. Writes made
  without sqlite-vec mark ``vec_chunks`` stale; the next index run with
  sqlite-vec rebuilds it from the BLOBs.

The file is opened through apsw when installed, else Python's sqlite3
(store_sqlite.py: why, the busy wait, loading sqlite-vec). A store another process
is writing (an index run) is waited for, then reported as busy, never as a damaged file.

The ``meta`` table ties an index to the export that built it (artifact_id, MRL
dim): vectors of two models or dims are not comparable, so a mismatch is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from gemma_edge.errors import InputError

from .chunking import Chunk
from .store_sqlite import connect, is_busy, load_sqlite_vec

STORE_FORMAT = 1
DEFAULT_DB_NAME = ".gemma-edge-search.sqlite"
SCAN_ROWS = 4096  # numpy scan batch: bounds memory on a 1 GB board
VEC_MAX_K = 4096  # sqlite-vec's limit for k

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, title TEXT NOT NULL,
    text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks(file_id);
CREATE TABLE IF NOT EXISTS vectors(
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL);
"""


@dataclass
class FileState:
    """What the index knows of a file, to decide whether it changed."""

    mtime_ns: int
    size: int
    sha256: str


@dataclass
class Hit:
    """One search result; ``text`` is the whole chunk (what a RAG prompt needs)."""

    path: str
    start_line: int
    end_line: int
    title: str
    score: float
    text: str

    def snippet(self, width: int = 240) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= width else flat[:width - 3] + "..."

    def to_dict(self, width: int = 240) -> dict[str, Any]:
        out = asdict(self)
        out["score"] = round(float(self.score), 6)
        out["snippet"] = self.snippet(width)
        return out


class VectorStore:
    """An open index file. ``use_vec``: None = sqlite-vec when it loads, False = never,
    True = required (raises when it cannot load)."""

    def __init__(self, path: Path, use_vec: Optional[bool] = None,
                 busy_timeout: Optional[float] = None, binding: Optional[str] = None):
        self.path = Path(path)
        self.conn, self._errors = connect(self.path, busy_timeout, binding)
        try:
            with self._busy_guard():
                self.conn.execute("PRAGMA foreign_keys = ON")
                tables = {r[0] for r in self.conn.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        except self._errors as exc:
            self.conn.close()
            raise InputError(f"{self.path}: not an SQLite file ({exc}); pass another --db "
                             "or delete it") from exc
        except BaseException:
            self.conn.close()
            raise
        if tables and "meta" not in tables:
            self.conn.close()
            raise InputError(f"{self.path}: an SQLite file but not a gemma-edge search index; "
                             "pass another --db")
        self.vec_version = load_sqlite_vec(self.conn) if use_vec is not False else None
        if use_vec and self.vec_version is None:
            self.conn.close()
            raise InputError("sqlite-vec was requested but cannot be loaded here: "
                             "pip install apsw sqlite-vec")
        self._has_vec_table = "vec_chunks" in tables
        self.meta = self._read_meta()

    @contextlib.contextmanager
    def _busy_guard(self) -> Iterator[None]:
        """A lock held past busy_timeout: "busy, try again", not a damaged file."""
        try:
            yield
        except self._errors as exc:
            if not is_busy(exc):
                raise
            raise InputError(f"{self.path}: busy, another process (an index run?) is writing "
                             "this index; try again when it has finished") from exc

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: on any exception (Ctrl-C included) the index is as before."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except self._errors as exc:
            if not is_busy(exc):
                raise
            raise InputError(f"{self.path}: another process is updating this index; run "
                             "again when it has finished") from exc
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.meta = self._read_meta()
            self._has_vec_table = self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'vec_chunks'").fetchone() is not None
            raise
        self.conn.execute("COMMIT")

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def uses_vec(self) -> bool:
        """k-NN via sqlite-vec (else the numpy scan)."""
        return (self.vec_version is not None and self._has_vec_table
                and self.meta.get("vec_synced") == "1")

    def _read_meta(self) -> dict[str, str]:
        with self._busy_guard():
            if self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                 "AND name = 'meta'").fetchone() is None:
                return {}  # a new, still empty file
            return {k: v for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        """Run an INSERT; the new rowid (sqlite3 cursors carry it, apsw connections)."""
        cursor = self.conn.execute(sql, params)
        rowid = getattr(cursor, "lastrowid", None)
        return int(rowid if rowid is not None else self.conn.last_insert_rowid())

    def set_meta(self, **values: Any) -> None:
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              (key, text))
            self.meta[key] = text

    def initialise(self, artifact_id: str, dim: int, output_dim: int) -> None:
        """Create the tables of an empty file (inside a transaction)."""
        if self.meta:
            raise InputError(f"{self.path}: already an index")
        self._create_tables()
        self.set_meta(format_version=str(STORE_FORMAT), artifact_id=artifact_id,
                      dim=str(int(dim)), output_dim=str(int(output_dim)), vec_synced="0")
        self.sync_vec_index()

    def _create_tables(self) -> None:
        # executescript() would COMMIT the open transaction; run statements one by one
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.conn.execute(statement)

    def check_compatible(self, artifact_id: str, dim: int) -> None:
        """Refuse an index built by another export, dim or store format."""
        meta, where = self.meta, self.path
        fix = "re-index with `gemma-edge search index DIR --rebuild"
        if meta.get("format_version") != str(STORE_FORMAT):
            raise InputError(f"{where}: index format {meta.get('format_version')!r}, this "
                             f"gemma-edge reads {STORE_FORMAT}; {fix}`")
        if meta.get("artifact_id") != artifact_id:
            raise InputError(f"{where}: built with model {meta.get('artifact_id')}, but the "
                             f"artifacts are model {artifact_id}; {fix}` (or pass the "
                             "artifacts that built it)")
        if int(meta["dim"]) != int(dim):
            raise InputError(f"{where}: holds {meta['dim']}-dim vectors, this run asks for "
                             f"{dim}; use --dim {meta['dim']}, or {fix} --dim {dim}`")

    # -- sqlite-vec index --------------------------------------------------------------
    def sync_vec_index(self) -> None:
        """(Re)build ``vec_chunks`` from the BLOBs if it is missing or stale (in a transaction)."""
        if self.vec_version is None or self.uses_vec:
            return
        self.conn.execute("DROP TABLE IF EXISTS vec_chunks")
        self.conn.execute("CREATE VIRTUAL TABLE vec_chunks USING vec0(chunk_id INTEGER PRIMARY "
                          f"KEY, embedding float[{self.dim}] distance_metric=cosine)")
        self.conn.execute("INSERT INTO vec_chunks(chunk_id, embedding) "
                          "SELECT chunk_id, embedding FROM vectors")
        self._has_vec_table = True
        self.set_meta(vec_synced="1")

    def _vec_write(self) -> bool:
        """True if vec_chunks must be written too; marks it stale when it cannot be."""
        if self.uses_vec:
            return True
        if self._has_vec_table and self.meta.get("vec_synced") != "0":
            self.set_meta(vec_synced="0")
        return False

    # -- files and chunks --------------------------------------------------------------
    def files(self) -> dict[str, FileState]:
        rows = self.conn.execute("SELECT path, mtime_ns, size, sha256 FROM files")
        return {r[0]: FileState(r[1], r[2], r[3]) for r in rows}

    def counts(self) -> tuple[int, int]:
        """(files, chunks) in the index."""
        files = self.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        chunks = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return int(files), int(chunks)

    def touch_file(self, path: str, state: FileState) -> None:
        """Same content, new mtime: remember it so the next run skips hashing."""
        self.conn.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE path = ?",
                          (state.mtime_ns, state.size, path))

    def delete_file(self, path: str) -> None:
        row = self.conn.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row is not None:
            self._delete_chunks(row[0])
            self.conn.execute("DELETE FROM files WHERE id = ?", (row[0],))

    def _delete_chunks(self, file_id: int) -> None:
        if self._vec_write():
            self.conn.execute("DELETE FROM vec_chunks WHERE chunk_id IN "
                              "(SELECT id FROM chunks WHERE file_id = ?)", (file_id,))
        self.conn.execute("DELETE FROM vectors WHERE chunk_id IN "
                          "(SELECT id FROM chunks WHERE file_id = ?)", (file_id,))
        self.conn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))

    def put_file(self, path: str, state: FileState, chunks: Sequence[Chunk],
                 vectors: np.ndarray) -> None:
        """Insert or replace a file with its chunks and their [n, dim] vectors."""
        vectors = np.asarray(vectors, dtype="<f4")
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"{path}: {vectors.shape} vectors for {len(chunks)} chunks "
                             f"of dim {self.dim}")
        row = self.conn.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            file_id = self._insert(
                "INSERT INTO files(path, mtime_ns, size, sha256) VALUES (?, ?, ?, ?)",
                (path, state.mtime_ns, state.size, state.sha256))
        else:
            file_id = row[0]
            self._delete_chunks(file_id)
            self.conn.execute("UPDATE files SET mtime_ns = ?, size = ?, sha256 = ? WHERE id = ?",
                              (state.mtime_ns, state.size, state.sha256, file_id))
        with_vec = self._vec_write()
        for chunk, vector in zip(chunks, vectors):
            chunk_id = self._insert(
                "INSERT INTO chunks(file_id, start_line, end_line, title, text) "
                "VALUES (?, ?, ?, ?, ?)",
                (file_id, chunk.start_line, chunk.end_line, chunk.title, chunk.text))
            blob = vector.tobytes()
            self.conn.execute("INSERT INTO vectors(chunk_id, embedding) VALUES (?, ?)",
                              (chunk_id, blob))
            if with_vec:
                self.conn.execute("INSERT INTO vec_chunks(chunk_id, embedding) VALUES (?, ?)",
                                  (chunk_id, blob))

    # -- search ------------------------------------------------------------------------
    def query(self, vector: np.ndarray, k: int = 5) -> list[Hit]:
        """Top-``k`` chunks by cosine similarity to one L2-normalised query vector."""
        vector = np.asarray(vector, dtype="<f4").reshape(-1)
        if vector.shape[0] != self.dim:
            raise InputError(f"query vector has {vector.shape[0]} dims, the index {self.dim}")
        if k < 1:
            raise InputError(f"k={k}: ask for at least one result")
        with self._busy_guard():
            pairs = self._knn_vec(vector, k) if self.uses_vec else self._knn_numpy(vector, k)
            if not pairs:
                return []
            marks = ",".join("?" * len(pairs))
            rows = self.conn.execute(
                "SELECT c.id, f.path, c.start_line, c.end_line, c.title, c.text FROM chunks c "
                f"JOIN files f ON f.id = c.file_id WHERE c.id IN ({marks})",
                [p[0] for p in pairs])
            by_id = {r[0]: r[1:] for r in rows}
        hits = [Hit(by_id[i][0], by_id[i][1], by_id[i][2], by_id[i][3], score, by_id[i][4])
                for i, score in pairs if i in by_id]
        return sorted(hits, key=lambda h: -h.score)

    def _knn_vec(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        rows = self.conn.execute(
            "SELECT chunk_id, distance FROM vec_chunks WHERE embedding MATCH ? AND k = ? "
            "ORDER BY distance", (vector.tobytes(), min(int(k), VEC_MAX_K)))
        return [(int(i), 1.0 - float(d)) for i, d in rows]

    def _knn_numpy(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Exact scan in batches of SCAN_ROWS, keeping only the running top-k."""
        best_ids = np.zeros(0, dtype=np.int64)
        best_scores = np.zeros(0, dtype=np.float32)
        cursor = self.conn.execute("SELECT chunk_id, embedding FROM vectors")
        width = self.dim * 4
        while True:
            rows = list(itertools.islice(cursor, SCAN_ROWS))
            if not rows:
                break
            if any(len(r[1]) != width for r in rows):
                raise InputError(f"{self.path}: a stored vector is not {self.dim} float32 "
                                 "values; the index is corrupted, re-index with --rebuild")
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
            scores = matrix.reshape(len(rows), self.dim) @ vector
            best_ids = np.concatenate([best_ids, ids])
            best_scores = np.concatenate([best_scores, scores.astype(np.float32)])
            if len(best_ids) > k:
                keep = np.argpartition(-best_scores, k - 1)[:k]
                best_ids, best_scores = best_ids[keep], best_scores[keep]
        order = np.lexsort((best_ids, -best_scores))
        return [(int(best_ids[i]), float(best_scores[i])) for i in order]
