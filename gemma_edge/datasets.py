"""The project's own text sets: the calibration corpus and the held-out evaluation set.

Both live in ``calibration_data/`` at the repository root (JSON lines, written
for this project). Calibration never sees the held-out set.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Type

from .errors import CalibrationDataError, GemmaEdgeError

CORPUS_FIELDS = ("id", "lang", "domain", "kind", "prompt", "text")
SHORT_FIELDS = ("id", "lang", "text")
# The short held-out sentences are "5-12 words" by this rule (documented in
# calibration_data/heldout/README.md): scripts that do not separate words with spaces
# count letters (Unicode category L*, so Thai vowel and tone marks do not count) per
# word; Vietnamese spaces separate syllables, about 1.3 per word; elsewhere a word is a
# space-separated token with at least one letter or digit.
LETTERS_PER_WORD = {"zh": 2.0, "ja": 2.0, "th": 3.0}
SYLLABLES_PER_WORD = {"vi": 1.3}


def data_dir() -> Path:
    env = os.environ.get("GEMMA_EDGE_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "calibration_data"
    if not path.is_dir():
        raise CalibrationDataError(f"{path}: calibration_data folder not found; run from a "
                                   "checkout of gemma-edge or set GEMMA_EDGE_DATA_DIR")
    return path


def iter_jsonl(path: Path, lines: Iterable[str],
               error: Type[GemmaEdgeError] = CalibrationDataError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; ``error`` names the bad line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError as exc:
            raise error(f"{path}:{number}: not JSON ({exc})") from exc


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, row in iter_jsonl(path, handle):
            missing = [k for k in required if k not in row]
            if missing:
                raise CalibrationDataError(f"{path}:{number}: missing {missing}")
            rows.append(row)
    return rows


def load_calibration_corpus(root: Optional[Path] = None) -> list[dict[str, Any]]:
    """Every calibration text (all languages), sorted by file then line."""
    corpus = (root or data_dir()) / "corpus"
    files = sorted(corpus.glob("*.jsonl"))
    if not files:
        raise CalibrationDataError(f"{corpus}: no *.jsonl files")
    return [row for f in files for row in read_jsonl(f, CORPUS_FIELDS)]


def load_heldout(root: Optional[Path] = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(queries, documents) of the held-out retrieval set; never used for calibration."""
    base = (root or data_dir()) / "heldout"
    docs = read_jsonl(base / "documents.jsonl", ("id", "lang", "text"))
    queries = read_jsonl(base / "queries.jsonl", ("id", "lang", "text", "relevant"))
    ids = {d["id"] for d in docs}
    for q in queries:
        unknown = [r for r in q["relevant"] if r not in ids]
        if unknown:
            raise CalibrationDataError(f"{base / 'queries.jsonl'}: query {q['id']} names "
                                       f"unknown documents {unknown}")
    return queries, docs


def word_count(text: str, lang: str) -> float:
    """Words in ``text`` by the short set's rule (fractional for the scripts without spaces)."""
    if lang in LETTERS_PER_WORD:
        letters = sum(unicodedata.category(c).startswith("L") for c in text)
        return letters / LETTERS_PER_WORD[lang]
    tokens = sum(1 for t in text.split() if any(c.isalnum() for c in t))
    return tokens / SYLLABLES_PER_WORD.get(lang, 1.0)


def load_short_heldout(root: Optional[Path] = None) -> list[dict[str, Any]]:
    """The held-out short everyday sentences (``heldout/short.jsonl``): the tail the
    retrieval set is too long to show; never used for calibration or for choosing a recipe."""
    path = (root or data_dir()) / "heldout" / "short.jsonl"
    if not path.is_file():
        raise CalibrationDataError(f"{path}: the short held-out sentences are missing; "
                                   "restore calibration_data/heldout/short.jsonl from the repository")
    rows = read_jsonl(path, SHORT_FIELDS)
    seen: set[str] = set()
    for row in rows:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise CalibrationDataError(f"{path}: {row['id']}: 'text' must be a non-empty string")
        if row["id"] in seen:
            raise CalibrationDataError(f"{path}: id {row['id']} appears twice")
        seen.add(row["id"])
    return rows
