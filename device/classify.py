"""Intent classification by nearest labelled examples (k-NN over embeddings).

Why k-NN and not a trained head: on a board there is no training loop, and a
handful of example phrasings per intent is usually enough for EmbeddingGemma's
"Classification" prompt. Adding an intent is editing a JSONL/CSV file.

A text's neighbours are its ``k`` most similar examples; each votes for its label
with its cosine similarity (negatives count 0), and per-label scores are the vote
shares. Example embeddings are cached in an .npz beside the examples file, keyed
by the model's artifact_id and the dim (one file per pair) and checked against a
hash of the examples and prompt, so editing the file re-embeds it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.atomic_files import atomic_write_bytes
from gemma_edge.errors import InputError

log = logging.getLogger("gemma_edge.device")


@dataclass
class Example:
    text: str
    label: str


@dataclass
class Prediction:
    """The winning label, its vote share, every label's share and the neighbours."""

    text: str
    label: str
    confidence: float
    scores: dict[str, float]
    best_similarity: dict[str, float]  # nearest example of each label, over all examples
    neighbours: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label,
                "confidence": round(self.confidence, 6),
                "scores": {k: round(v, 6) for k, v in self.scores.items()},
                "best_similarity": {k: round(v, 6) for k, v in self.best_similarity.items()},
                "neighbours": self.neighbours}


def load_examples(path: Path) -> list[Example]:
    """Labelled examples from .jsonl ({"text", "label"} per line) or .csv (header text,label)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such examples file")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); save it as UTF-8 text") from exc
    if path.suffix.lower() == ".csv":
        examples = _from_csv(path, content)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        examples = _from_jsonl(path, content)
    else:
        raise InputError(f"{path}: unknown format; use .jsonl or .csv")
    if not examples:
        raise InputError(f"{path}: no examples; add lines with a text and a label")
    if len({e.label for e in examples}) == 1:
        log.warning("%s: only one label (%s): every text gets it", path, examples[0].label)
    return examples


def _from_jsonl(path: Path, content: str) -> list[Example]:
    from gemma_edge.datasets import iter_jsonl

    return [_example(path, number, row)
            for number, row in iter_jsonl(path, content.splitlines(), InputError)]


def _from_csv(path: Path, content: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(content))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "text" not in fields or "label" not in fields:
        raise InputError(f"{path}: the first row must be a header with 'text' and 'label' "
                         f"columns (found {', '.join(fields) or 'nothing'})")
    reader.fieldnames = fields
    return [_example(path, number, row) for number, row in enumerate(reader, 2)
            if any((v or "").strip() for v in row.values() if isinstance(v, str))]


def _example(path: Path, number: int, row: Any) -> Example:
    if not isinstance(row, dict):
        raise InputError(f"{path}:{number}: expected an object with 'text' and 'label'")
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{path}:{number}: missing or empty 'text'")
    if not isinstance(label, (str, int)) or not str(label).strip():
        raise InputError(f"{path}:{number}: missing or empty 'label'")
    return Example(text.strip(), str(label).strip())


def classification_prompt(prompts: dict[str, str]) -> str:
    """The model's classification prompt name if it has one, else "query"."""
    for name in prompts:
        if name.lower() == "classification":
            return name
    return "query"


def cache_path(examples_path: Path, artifact_id: str, dim: int) -> Path:
    return Path(examples_path).with_name(f"{Path(examples_path).name}.{artifact_id}.d{dim}.npz")


class Classifier:
    """k-NN intent classifier; ``examples_path`` enables the embedding cache beside it."""

    def __init__(self, embedder: Any, examples: Sequence[Example], k: int = 5,
                 dim: Optional[int] = None, examples_path: Optional[Path] = None):
        if not examples:
            raise InputError("no examples to classify against")
        if k < 1:
            raise InputError(f"k={k}: use at least one neighbour")
        self.embedder = embedder
        self.examples = list(examples)
        self.k = int(k)
        self.dim = int(dim if dim is not None else embedder.output_dim)
        if self.dim not in [int(d) for d in embedder.mrl_dims]:
            raise InputError(f"--dim {self.dim}: the model's Matryoshka dims are "
                             f"{', '.join(str(d) for d in embedder.mrl_dims)}")
        self.prompt_name = classification_prompt(dict(embedder.prompts))
        self.labels = sorted({e.label for e in self.examples})
        self.vectors = self._example_vectors(examples_path)

    def _key(self) -> str:
        digest = hashlib.sha256(self.prompt_name.encode())
        for e in self.examples:
            digest.update(b"\0" + e.label.encode() + b"\0" + e.text.encode())
        return digest.hexdigest()

    def _example_vectors(self, examples_path: Optional[Path]) -> np.ndarray:
        shape = (len(self.examples), self.dim)
        path = (cache_path(examples_path, self.embedder.artifact_id, self.dim)
                if examples_path is not None else None)
        key = self._key()
        if path is not None and path.is_file():
            try:
                with np.load(str(path), allow_pickle=False) as data:
                    if str(data["key"]) == key and data["vectors"].shape == shape:
                        log.debug("example embeddings from %s", path)
                        return np.asarray(data["vectors"], dtype=np.float32)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s: unreadable cache (%s); re-embedding", path, exc)
        vectors = self.embedder.encode([e.text for e in self.examples],
                                       prompt_name=self.prompt_name, dim=self.dim)
        if path is not None:
            buffer = io.BytesIO()
            np.savez(buffer, vectors=vectors.astype(np.float32), key=np.array(key),
                     artifact_id=np.array(self.embedder.artifact_id), dim=np.array(self.dim))
            try:
                atomic_write_bytes(path, buffer.getvalue())
            except OSError as exc:
                log.warning("%s: cannot write the embedding cache (%s)", path, exc)
        return vectors

    def predict(self, texts: Sequence[str], neighbours: int = 3) -> list[Prediction]:
        """One Prediction per text; ``neighbours`` nearest examples are reported with it."""
        texts = list(texts)
        if not texts:
            return []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text {i + 1} is empty; nothing to classify")
        queries = self.embedder.encode(texts, prompt_name=self.prompt_name, dim=self.dim)
        sims = np.asarray(self.embedder.similarity(queries, self.vectors), dtype=np.float64)
        labels = [e.label for e in self.examples]
        k = min(self.k, len(self.examples))
        return [self._vote(text, row, labels, k, neighbours) for text, row in zip(texts, sims)]

    def _vote(self, text: str, row: np.ndarray, labels: list[str], k: int,
              neighbours: int) -> Prediction:
        order = np.argsort(-row, kind="stable")
        top = order[:k]
        weights = np.clip(row[top], 0.0, None)
        if weights.sum() <= 0:  # every neighbour dissimilar: plain majority
            weights = np.ones(len(top))
        votes = {label: 0.0 for label in self.labels}
        nearest = {label: -1.0 for label in self.labels}
        for idx, weight in zip(top, weights):
            votes[labels[idx]] += float(weight)
        for idx in order:
            nearest[labels[idx]] = max(nearest[labels[idx]], float(row[idx]))
        total = sum(votes.values())
        scores = {label: votes[label] / total for label in self.labels}
        best = max(self.labels, key=lambda label: (scores[label], nearest[label]))
        shown = [{"text": self.examples[i].text, "label": labels[i],
                  "similarity": round(float(row[i]), 6)} for i in order[:neighbours]]
        return Prediction(text, best, scores[best], scores, nearest, shown)
