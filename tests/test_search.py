"""The search index: incremental indexing, transactions, model checks, both k-NN engines, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from gemma_edge.cli import main
from gemma_edge.device.indexing import index_directory, open_for_indexing, open_for_query
from gemma_edge.device.store import DEFAULT_DB_NAME, VectorStore
from gemma_edge.errors import InputError

STOP = {"title", "text", "none", "task", "search", "result", "query"}


class FakeTokenizer:
    def encode(self, texts, max_len):
        ids, cut = [], []
        for text in texts:
            words = [zlib.crc32(w.encode()) % 1000 for w in text.split()]
            cut.append(len(words) + 2 > max_len)
            ids.append([1] + words[:max_len - 2] + [2])
        return ids, cut


class FakeEmbedder:
    """Bag-of-words vectors (hashed) plus a little per-text noise so no two scores tie.

    Counts what it embeds, and can fail on its n-th document call to test rollback.
    """

    output_dim = 64
    mrl_dims = [64, 32]
    max_tokens = 48
    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}

    def __init__(self, artifact_id: str = "fa4e0000fa4e0000", fail_on_call: Optional[int] = None):
        self.artifact_id = artifact_id
        self.fail_on_call = fail_on_call
        self.tokenizer = FakeTokenizer()
        self.documents: list[str] = []
        self.calls = 0

    def encode(self, texts, prompt_name=None, prompt=None, dim=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        dim = dim or self.output_dim
        out = np.zeros((len(texts), self.output_dim), dtype=np.float64)
        for row, text in zip(out, texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                if word not in STOP:
                    code = zlib.crc32(word.encode())
                    row[code % self.output_dim] += 1.0 if (code >> 8) & 1 else -1.0
            noise = np.random.default_rng(zlib.crc32(text.encode()))
            row += 0.05 * noise.standard_normal(self.output_dim)
        out = out[:, :dim]
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_query(self, texts, dim=None):
        return self.encode(texts, "query", dim=dim)

    def encode_document(self, texts, dim=None, title=None):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("simulated crash while embedding")
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.documents.extend(texts)
        titles = title if isinstance(title, list) else [title] * len(texts)
        return self.encode([f"title: {t or 'none'} | text: {x}" for t, x in zip(titles, texts)],
                           dim=dim)

    @staticmethod
    def similarity(a, b):
        return np.atleast_2d(a) @ np.atleast_2d(b).T


CORPUS = {
    "docs/install.md": "# Install\n\nInstall the runtime with apt on Debian.\n\n"
                       "## Board\n\nFlash Mendel Linux onto the Coral board.\n",
    "notes.txt": "Shopping list: apples, bread, cheese.\n\nCall grandmother on Sunday.\n",
    "src/tool.py": "def parse_config(path):\n    return open(path).read()\n\n\n"
                   "class Server:\n    def serve_forever(self):\n        pass\n",
    "src/blob.txt": "binary\x00data",
}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for rel, text in CORPUS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def build(root: Path, embedder: FakeEmbedder, db: Optional[Path] = None, rebuild=False,
          dim=None, use_vec=None):
    db = db or root / DEFAULT_DB_NAME
    with open_for_indexing(db, embedder, dim=dim, rebuild=rebuild, use_vec=use_vec) as store:
        return index_directory(store, embedder, root, batch_size=2)


def snapshot(db: Path) -> tuple:
    with VectorStore(db, use_vec=False) as store:
        rows = store.conn.execute(
            "SELECT f.path, f.sha256, c.start_line, c.text, v.embedding FROM chunks c "
            "JOIN files f ON f.id = c.file_id JOIN vectors v ON v.chunk_id = c.id "
            "ORDER BY f.path, c.start_line").fetchall()
        return store.files(), rows


def test_index_and_query(corpus: Path) -> None:
    embedder = FakeEmbedder()
    report = build(corpus, embedder)
    assert sorted(report.added) == ["docs/install.md", "notes.txt", "src/tool.py"]
    assert "binary" in report.skipped["src/blob.txt"]
    db = corpus / DEFAULT_DB_NAME
    with open_for_query(db, embedder) as store:
        assert store.meta["artifact_id"] == embedder.artifact_id and store.dim == 64
        assert store.meta["output_dim"] == "64" and store.meta["format_version"] == "1"
        hits = store.query(embedder.encode_query("flash mendel linux board")[0], k=3)
        assert hits[0].path == "docs/install.md" and hits[0].title == "Install > Board"
        assert hits[0].start_line == 5 and "Mendel" in hits[0].snippet()
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        code = store.query(embedder.encode_query("parse config path")[0], k=1)[0]
        assert (code.path, code.title) == ("src/tool.py", "tool.py: parse_config")


def test_incremental_reindex_embeds_only_changed_files(corpus: Path) -> None:
    build(corpus, FakeEmbedder())
    again = FakeEmbedder()
    report = build(corpus, again)
    assert again.documents == [] and report.unchanged == 3

    (corpus / "notes.txt").write_text("Shopping list: apples, bread, cheese, coffee.\n")
    (corpus / "new.md").write_text("# New\n\nA fresh page about coffee.\n")
    os.utime(corpus / "src/tool.py", ns=(1, 1))  # touched, same content: no re-embedding
    (corpus / "docs/install.md").unlink()
    counting = FakeEmbedder()
    report = build(corpus, counting)
    assert (report.added, report.changed, report.removed) == (
        ["new.md"], ["notes.txt"], ["docs/install.md"])
    assert sorted(counting.documents) == ["# New\n\nA fresh page about coffee.",
                                          "Shopping list: apples, bread, cheese, coffee."]
    files, rows = snapshot(corpus / DEFAULT_DB_NAME)
    assert sorted(files) == ["new.md", "notes.txt", "src/tool.py"]
    assert files["src/tool.py"].mtime_ns == 1  # remembered, so no hashing next time
    assert not any(path == "docs/install.md" for path, *_ in rows)
    assert build(corpus, FakeEmbedder()).chunks_embedded == 0


def test_crash_mid_index_keeps_previous_state(corpus: Path) -> None:
    build(corpus, FakeEmbedder())
    db = corpus / DEFAULT_DB_NAME
    before = snapshot(db)
    (corpus / "notes.txt").unlink()
    (corpus / "docs/install.md").write_text("# Changed\n\n" + "word " * 200)
    (corpus / "more.txt").write_text("another file\n")
    crashing = FakeEmbedder(fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(corpus, crashing)
    assert crashing.documents  # some files were written inside the transaction
    assert snapshot(db) == before
    with pytest.raises(RuntimeError):  # a failed --rebuild keeps the old index too
        build(corpus, FakeEmbedder(artifact_id="0" * 16, fail_on_call=1), rebuild=True)
    assert snapshot(db) == before
    assert sorted(p.name for p in corpus.iterdir() if p.name.startswith(".")) == [DEFAULT_DB_NAME]
    report = build(corpus, FakeEmbedder())
    assert report.removed == ["notes.txt"] and report.added == ["more.txt"]


def test_other_model_or_dim_is_refused_until_rebuild(corpus: Path) -> None:
    build(corpus, FakeEmbedder())
    db = corpus / DEFAULT_DB_NAME
    other = FakeEmbedder(artifact_id="beef" * 4)
    with pytest.raises(InputError, match=r"built with model fa4e0000fa4e0000.*--rebuild"):
        open_for_query(db, other)
    with pytest.raises(InputError, match=r"64-dim vectors.*--dim 64.*--rebuild"):
        build(corpus, FakeEmbedder(), dim=32)
    with pytest.raises(InputError, match="Matryoshka dims are 64, 32"):
        build(corpus, FakeEmbedder(), dim=100)
    report = build(corpus, other, dim=32, rebuild=True)
    assert len(report.added) == 3
    with open_for_query(db, other) as store:
        assert (store.meta["artifact_id"], store.dim) == ("beef" * 4, 32)
        assert len(store.query(other.encode_query("apples", dim=32)[0], k=2)) == 2


def test_apps_import_nothing_heavy() -> None:
    """apps.py builds the CLI parser on a board: no numpy, SQLite or frameworks at import."""
    code = ("import sys, gemma_edge.device.apps, gemma_edge.device.chunking; "
            "print(sorted(m for m in ('numpy', 'sqlite3', 'tqdm', 'torch', 'transformers', "
            "'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_non_index_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError, match="not an SQLite file"):
        open_for_query(junk, FakeEmbedder())
    other = tmp_path / "other.sqlite"
    sqlite3.connect(str(other)).execute("CREATE TABLE t(x)").connection.close()
    with pytest.raises(InputError, match="not a gemma-edge search index"):
        open_for_query(other, FakeEmbedder())
    with pytest.raises(InputError, match="no search index here"):
        open_for_query(tmp_path / "missing.sqlite", FakeEmbedder())


VEC_CHECK = ("from gemma_edge.device.store_sqlite import sqlite_vec_available; "
             "assert sqlite_vec_available()")
VEC_SCRIPT = """
import json, sys
import numpy as np
from gemma_edge.device.store import VectorStore
db, queries, k = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
with VectorStore(db, use_vec=True) as store:
    before = store.uses_vec
    with store.transaction():
        store.sync_vec_index()
    hits = [[[h.path, h.start_line, h.score] for h in store.query(q, k)] for q in queries]
    print(json.dumps({"before": before, "after": store.uses_vec, "hits": hits}))
"""


def vec_python() -> Optional[list[str]]:
    """A command running Python with sqlite-vec loadable and this venv's packages, or None.

    With apsw installed (the search extra) this venv's own interpreter loads it; without,
    its sqlite3 may lack loadable-extension support (pyenv builds) and a system Python
    of the same version can borrow the venv's site-packages.
    """
    sites = [p for p in sys.path if p.endswith("site-packages")]
    prelude = (f"import site, sys; assert sys.version_info[:2] == {tuple(sys.version_info[:2])}; "
               f"[site.addsitedir(p) for p in {sites!r}]; ")
    for exe in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if exe and os.path.exists(exe):
            ok = subprocess.run([exe, "-c", prelude + VEC_CHECK], capture_output=True)
            if ok.returncode == 0:
                return [exe, "-c", prelude + VEC_SCRIPT]
    return None


def test_sqlite_vec_and_numpy_scan_agree(corpus: Path, tmp_path: Path) -> None:
    command = vec_python()
    if command is None:
        pytest.skip("no Python here can load sqlite-vec (sqlite3 without loadable extensions)")
    embedder = FakeEmbedder()
    build(corpus, embedder, use_vec=False)  # BLOBs only: sqlite-vec builds its index from them
    db = corpus / DEFAULT_DB_NAME
    texts = ["install apt debian", "coral board", "apples bread", "server forever", "config"]
    queries = embedder.encode_query(texts)
    np.save(tmp_path / "q.npy", queries)

    def vec_run() -> dict:
        out = subprocess.run(command + [str(db), str(tmp_path / "q.npy"), "4"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    result = vec_run()
    assert (result["before"], result["after"]) == (False, True)
    with open_for_query(db, embedder, use_vec=False) as store:
        assert not store.uses_vec
        expected = [[[h.path, h.start_line, h.score] for h in store.query(q, 4)] for q in queries]
    for got, want in zip(result["hits"], expected):
        assert [g[:2] for g in got] == [w[:2] for w in want]
        assert np.allclose([g[2] for g in got], [w[2] for w in want], atol=1e-5)
    # a write without sqlite-vec marks its index stale; sqlite-vec then rebuilds it
    (corpus / "notes.txt").write_text("Install apt packages on Debian, then reboot.\n")
    build(corpus, embedder, use_vec=False)
    with VectorStore(db, use_vec=False) as store:
        assert store.meta["vec_synced"] == "0"
    result = vec_run()
    assert (result["before"], result["after"]) == (False, True)
    assert "notes.txt" in [hit[0] for hit in result["hits"][0]]  # the new text is found


@pytest.fixture()
def fake_cli(monkeypatch: pytest.MonkeyPatch) -> FakeEmbedder:
    embedder = FakeEmbedder()
    monkeypatch.setattr("gemma_edge.cli.make_embedder", lambda args: embedder)
    return embedder


def test_cli_with_fake_embedder(corpus: Path, fake_cli: FakeEmbedder, capsys) -> None:
    db = corpus / DEFAULT_DB_NAME
    assert main(["search", "index", str(corpus), "--artifacts", "x", "--glob", "*.md"]) == 0
    assert "1 new" in capsys.readouterr().out
    assert main(["search", "query", "mendel board", "--artifacts", "x", "--db", str(db),
                 "-k", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["path"] == "docs/install.md"
    assert set(result["hits"][0]) >= {"path", "start_line", "end_line", "title", "score",
                                      "snippet", "text"}
    assert main(["search", "query", "  ", "--artifacts", "x", "--db", str(db)]) == 2
    assert "empty query" in capsys.readouterr().err
    assert main(["search", "index", str(corpus / "nope"), "--artifacts", "x"]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    assert main(["search", "index", str(corpus), "--artifacts", "x", "--dim", "32"]) == 2
    assert "--rebuild" in capsys.readouterr().err


def test_cli_end_to_end_with_tiny_model(tiny_artifacts: Path, corpus: Path, capsys) -> None:
    art = ["--artifacts", str(tiny_artifacts), "--backend", "cpu"]
    assert main(["search", "index", str(corpus), "--dim", "128", *art]) == 0
    out = capsys.readouterr().out
    assert "3 new" in out and "dim 128" in out
    assert main(["search", "index", str(corpus), *art]) == 0  # the index's dim is the default
    assert "0 chunks embedded" in capsys.readouterr().out
    assert main(["search", "query", "Coral board", "-k", "2", "--json", "--db",
                 str(corpus / DEFAULT_DB_NAME), *art]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    from gemma_edge.device import Embedder

    embedder = Embedder(tiny_artifacts, backend="cpu")
    with open_for_query(corpus / DEFAULT_DB_NAME, embedder) as store:
        cid, title, text = store.conn.execute("SELECT id, title, text FROM chunks").fetchone()
        blob = store.conn.execute("SELECT embedding FROM vectors WHERE chunk_id = ?",
                                  (cid,)).fetchone()[0]
    stored = np.frombuffer(blob, dtype="<f4")
    fresh = embedder.encode_document([text], dim=128, title=title)[0]
    assert np.allclose(stored, fresh, atol=1e-5)


def test_sqlite_vec_is_what_users_get_with_the_search_extra(corpus: Path) -> None:
    """With apsw and sqlite-vec installed, a plain index run searches by sqlite-vec; the
    stdlib sqlite3 binding (no extension loading here) falls back to the numpy scan and
    finds the same chunks."""
    pytest.importorskip("apsw")
    pytest.importorskip("sqlite_vec")
    from gemma_edge.device.store_sqlite import sqlite_vec_available

    assert sqlite_vec_available(), "apsw and sqlite-vec are installed but sqlite-vec did not load"
    embedder = FakeEmbedder()
    build(corpus, embedder)
    db = corpus / DEFAULT_DB_NAME
    query = embedder.encode_query("flash mendel linux board")[0]
    with open_for_query(db, embedder) as store:
        assert store.uses_vec and type(store.conn).__module__.startswith("apsw")
        by_vec = [(h.path, h.start_line, round(h.score, 5)) for h in store.query(query, 3)]
    with VectorStore(db, binding="sqlite3") as store:
        loads = hasattr(store.conn, "enable_load_extension")
        assert store.uses_vec == loads
        by_scan = [(h.path, h.start_line, round(h.score, 5)) for h in store.query(query, 3)]
    assert by_vec == by_scan and by_vec[0][0] == "docs/install.md"


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def locked(db: Path, seconds: float):
    """Another process holds an exclusive lock on ``db`` (as an index run's commit does)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_locked_index_is_busy_not_damaged(corpus: Path, fake_cli: FakeEmbedder, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    build(corpus, fake_cli)
    db = corpus / DEFAULT_DB_NAME
    monkeypatch.setattr("gemma_edge.device.store_sqlite.BUSY_TIMEOUT_S", 0.3)
    with locked(db, 60):
        with pytest.raises(InputError, match="busy") as caught:
            open_for_query(db, fake_cli)
        assert "delete" not in str(caught.value) and "not an SQLite" not in str(caught.value)
        assert main(["search", "query", "mendel board", "--artifacts", "x", "--db", str(db)]) == 2
        err = capsys.readouterr().err
        assert "busy" in err and "try again" in err and "delete" not in err
        with pytest.raises(InputError, match="another process"):
            build(corpus, FakeEmbedder())
    with locked(db, 1.0):  # released within the wait: the query just waits, then answers
        with VectorStore(db, busy_timeout=30) as store:
            hits = store.query(fake_cli.encode_query("flash mendel linux board")[0], k=1)
    assert hits[0].path == "docs/install.md"
