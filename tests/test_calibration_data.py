"""The project's own corpora are what the brief says they are, and never overlap."""

from __future__ import annotations

from collections import Counter

from gemma_edge.datasets import load_calibration_corpus, load_heldout

PROMPTS = {"query", "document", "Classification", "Clustering", "STS", "Summarization",
           "InstructionRetrieval"}


def test_calibration_corpus_shape():
    rows = load_calibration_corpus()
    assert len(rows) >= 1000
    langs = Counter(r["lang"] for r in rows)
    assert len(langs) >= 16, langs
    domains = {r["domain"] for r in rows}
    assert {"web", "code", "chat", "science", "legal", "product"} <= domains
    assert {r["kind"] for r in rows} == {"query", "document"}
    assert {r["prompt"] for r in rows} <= PROMPTS
    assert len({r["id"] for r in rows}) == len(rows)
    words = sorted(len(r["text"].split()) for r in rows if r["lang"] not in ("zh", "ja"))
    assert words[-1] >= 300, "long documents reaching the 512-token bucket are needed"


def test_heldout_set_shape_and_separation():
    queries, docs = load_heldout()
    assert len({q["lang"] for q in queries}) >= 8
    assert sum(bool(q.get("cross_lingual")) for q in queries) >= 20
    doc_lang = {d["id"]: d["lang"] for d in docs}
    for q in queries:
        crosses = any(doc_lang[r] != q["lang"] for r in q["relevant"])
        assert crosses == bool(q.get("cross_lingual")), q["id"]
    calibration = {r["text"].strip() for r in load_calibration_corpus()}
    held = {d["text"].strip() for d in docs} | {q["text"].strip() for q in queries}
    assert not calibration & held, "held-out texts must never be in the calibration corpus"


def test_single_texts_follow_the_bucket_ladder():
    """A bucket is calibrated on the single texts the device sends to it: longer than the
    next smaller bucket of the ladder the graphs exist for."""
    import numpy as np

    from gemma_edge.export.calibration import bucket_samples

    class Table:
        def lookup(self, ids):
            return np.ones((len(ids), 8), np.float32)

    class FakeEmbedder:
        buckets, slots, hidden, table = [16, 32, 64], 4, 8, Table()

    ids = [[1] * n for n in (5, 10, 20, 30, 40, 60)]

    def single_lengths(samples):
        return sorted({int(s["pool"][0, 0].sum()) for s in samples if s["pool"][0, 1:].sum() == 0})

    # (32: longer texts cut to the bucket, added when too few texts fit it)
    assert single_lengths(bucket_samples(FakeEmbedder(), ids, 32, 24)) == [20, 30, 32]
    sparse = bucket_samples(FakeEmbedder(), ids, 32, 24, ladder=[32, 64])
    assert single_lengths(sparse) == [5, 10, 20, 30, 32]


WEIGHTED = ("ar", "tr", "sw", "vi", "pl", "hi", "ja", "ko", "th", "he", "fa", "bn")


def _readme_short_counts() -> dict[str, int]:
    """The per-language counts heldout/README.md claims for short.jsonl (its last table)."""
    import re

    from gemma_edge.datasets import data_dir

    text = (data_dir() / "heldout" / "README.md").read_text(encoding="utf-8")
    section = text.split("(`short.jsonl`)", 1)[1]
    return {lang: int(n) for lang, n in re.findall(r"\| ([a-z]{2}) \| (\d+) ", section)}


def test_short_sentences_shape_and_claimed_counts():
    from gemma_edge.datasets import load_short_heldout, word_count

    rows = load_short_heldout()
    counts = Counter(r["lang"] for r in rows)
    assert len(rows) >= 1000 and len(counts) >= 16, counts
    assert all(counts[lang] >= 70 for lang in WEIGHTED), counts
    assert all(n >= 30 for n in counts.values()), counts
    assert dict(counts) == _readme_short_counts(), "heldout/README.md's table must match the file"
    for row in rows:
        assert row["id"].startswith(f"s-{row['lang']}-"), row["id"]
        words = word_count(row["text"], row["lang"])
        assert 5 <= words <= 12, (row["id"], words, row["text"])
    assert len({r["text"] for r in rows}) == len(rows), "a sentence appears twice"


def test_word_count_rule():
    from gemma_edge.datasets import word_count

    assert word_count("I forgot my password again , sorry .", "en") == 6  # punctuation alone: no word
    assert word_count("今日は雨です。", "ja") == 3.0  # 6 letters / 2, the full stop not a letter
    assert word_count("ฉันเจ็บคอ", "th") == 7 / 3  # 9 code points, 2 of them vowel/tone marks
    assert word_count("Tôi quên mật khẩu", "vi") == 4 / 1.3


def test_short_sentences_never_in_calibration():
    """No short sentence is a calibration text or part of one (case and spacing ignored),
    nor a text of the held-out retrieval set."""
    from gemma_edge.datasets import load_short_heldout

    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    calibration = [norm(r["text"]) for r in load_calibration_corpus()]
    queries, docs = load_heldout()
    retrieval = {norm(x["text"]) for x in queries + docs}
    for row in load_short_heldout():
        text = norm(row["text"])
        assert text not in retrieval, row["id"]
        assert not any(text in c for c in calibration), row["id"]
