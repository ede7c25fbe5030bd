"""``gemma-edge search`` and ``gemma-edge classify``: on-device apps over the Embedder.

This module is imported to build the CLI parser on a board, so it imports only
the standard library at module level; numpy, the Embedder, SQLite and tqdm are
imported inside the handlers. Handlers return exit codes and raise
gemma_edge.errors exceptions for bad input (the CLI prints those as one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from gemma_edge.errors import InputError


def register(subparsers: Any) -> None:
    """Add the ``search`` (with ``index`` and ``query``) and ``classify`` subcommands."""
    from gemma_edge.cli import _add_runtime_args

    search = subparsers.add_parser(
        "search", help="index a folder of text/markdown/code and search it by meaning")
    modes = search.add_subparsers(dest="search_command", metavar="{index,query}")
    modes.required = True

    p = modes.add_parser("index", help="embed new and changed files of DIR into the index")
    p.add_argument("dir", type=Path, metavar="DIR", help="folder to index (recursively)")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--db", type=Path, default=None,
                   help="index file (default DIR/.gemma-edge-search.sqlite)")
    p.add_argument("--dim", type=int, default=None,
                   help="Matryoshka dimension (default: the index's, else the model's full)")
    p.add_argument("--rebuild", action="store_true",
                   help="start a fresh index (needed after changing model or --dim)")
    p.add_argument("--glob", default=None,
                   help="comma-separated file patterns, e.g. '*.md,*.py,docs/*.txt' "
                        "(default: common text, markdown and code files)")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per model call")
    p.add_argument("--chunk-tokens", type=int, default=256,
                   help="chunk size in tokens (capped by the model's largest bucket)")
    p.add_argument("--no-vec", action="store_true",
                   help="do not use sqlite-vec even if it loads (exact numpy scan)")
    _add_runtime_args(p)
    p.set_defaults(func=run_index)

    q = modes.add_parser("query", help="top-k chunks of the index for a question")
    q.add_argument("text", metavar="TEXT", help="what to search for")
    q.add_argument("--artifacts", required=True, type=Path)
    q.add_argument("--db", type=Path, default=None,
                   help="index file (default ./.gemma-edge-search.sqlite)")
    q.add_argument("-k", "--k", type=int, default=5, help="number of results")
    q.add_argument("--dim", type=int, default=None, help="default: the index's dimension")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.add_argument("--no-vec", action="store_true",
                   help="do not use sqlite-vec even if it loads (exact numpy scan)")
    _add_runtime_args(q)
    q.set_defaults(func=run_query)

    c = subparsers.add_parser("classify",
                              help="label texts by their nearest labelled examples (k-NN)")
    c.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    c.add_argument("--artifacts", required=True, type=Path)
    c.add_argument("--examples", required=True, type=Path,
                   help="labelled examples: .jsonl {\"text\", \"label\"} or .csv with a "
                        "text,label header")
    c.add_argument("--input", type=Path, default=None,
                   help="more texts: one per line, or .jsonl with a 'text' field")
    c.add_argument("-k", "--k", type=int, default=5, help="neighbours that vote")
    c.add_argument("--dim", type=int, default=None, help="Matryoshka dimension")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    c.add_argument("--no-cache", action="store_true",
                   help="do not read or write the example-embedding cache (.npz)")
    _add_runtime_args(c)
    c.set_defaults(func=run_classify)


@contextlib.contextmanager
def _progress(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar, created on first use."""
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            from tqdm.auto import tqdm

            bars.append(tqdm(total=total, desc=desc, unit="chunk"))
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        if bars:
            bars[0].close()


def _vec_choice(args: argparse.Namespace) -> Optional[bool]:
    return False if getattr(args, "no_vec", False) else None


def run_index(args: argparse.Namespace) -> int:
    from gemma_edge.cli import make_embedder

    from .chunking import Chunker, parse_globs
    from .indexing import index_directory, open_for_indexing
    from .store import DEFAULT_DB_NAME

    root: Path = args.dir
    if not root.is_dir():
        raise InputError(f"{root}: no such directory; pass the folder to index")
    if args.batch_size < 1 or args.chunk_tokens < 16:
        raise InputError("--batch-size must be >= 1 and --chunk-tokens >= 16")
    db = args.db if args.db is not None else root / DEFAULT_DB_NAME
    embedder = make_embedder(args)
    chunker = Chunker(embedder, chunk_tokens=args.chunk_tokens)
    with open_for_indexing(db, embedder, dim=args.dim, rebuild=args.rebuild,
                           use_vec=_vec_choice(args)) as store:
        with _progress("embedding") as progress:
            report = index_directory(store, embedder, root, parse_globs(args.glob), chunker,
                                     batch_size=args.batch_size, progress=progress)
        files, chunks = store.counts()
        engine = f"sqlite-vec {store.vec_version}" if store.uses_vec else "numpy scan"
        dim = store.dim
    print(f"indexed {root}: {len(report.added)} new, {len(report.changed)} changed, "
          f"{len(report.removed)} removed, {report.unchanged} unchanged, "
          f"{len(report.skipped)} skipped; {report.chunks_embedded} chunks embedded "
          f"in {report.seconds:.1f} s")
    print(f"{db}: {files} files, {chunks} chunks, dim {dim}, search by {engine}")
    return 0


def run_query(args: argparse.Namespace) -> int:
    from gemma_edge.cli import make_embedder

    from .indexing import open_for_query
    from .store import DEFAULT_DB_NAME

    text = args.text.strip()
    if not text:
        raise InputError("empty query; pass the text to search for")
    if args.k < 1:
        raise InputError(f"-k {args.k}: ask for at least one result")
    db = args.db if args.db is not None else Path(DEFAULT_DB_NAME)
    if not db.is_file():
        raise InputError(f"{db}: no search index here; build one with `gemma-edge search "
                         "index DIR` or pass --db")
    embedder = make_embedder(args)
    with contextlib.closing(open_for_query(db, embedder, args.dim, _vec_choice(args))) as store:
        vector = embedder.encode_query([text], dim=store.dim)[0]
        hits = store.query(vector, args.k)
        root = store.meta.get("root", "")
    if args.json:
        print(json.dumps({"query": text, "db": str(db), "root": root,
                          "hits": [h.to_dict() for h in hits]}, indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"{db}: the index is empty", file=sys.stderr)
    for rank, hit in enumerate(hits, 1):
        title = f"  [{hit.title}]" if hit.title else ""
        print(f"{rank}. {hit.score:.3f}  {hit.path}:{hit.start_line}-{hit.end_line}{title}")
        print(f"   {hit.snippet()}")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from gemma_edge.cli import make_embedder, read_texts

    from .classify import Classifier, load_examples

    texts = list(args.texts)
    for i, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"TEXT argument {i + 1} is empty")
    if args.input is not None:
        texts.extend(read_texts(args.input))
    if not texts:
        raise InputError("nothing to classify; pass TEXT arguments or --input FILE")
    examples = load_examples(args.examples)
    embedder = make_embedder(args)
    classifier = Classifier(embedder, examples, k=args.k, dim=args.dim,
                            examples_path=None if args.no_cache else args.examples)
    predictions = classifier.predict(texts)
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2, ensure_ascii=False))
        return 0
    for p in predictions:
        others = ", ".join(f"{label} {score:.2f}" for label, score in
                           sorted(p.scores.items(), key=lambda kv: -kv[1]) if label != p.label)
        print(f"{p.label}\t{p.confidence:.2f}\t{p.text}" + (f"\t({others})" if others else ""))
    return 0
