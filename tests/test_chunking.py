"""Chunking: boundaries, titles, line numbers, budgets, overlap and skipped files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gemma_edge.device.chunking import (
    Chunker,
    SkipFile,
    file_kind,
    iter_files,
    load_text_file,
    parse_globs,
)

MARKDOWN = """# Guide

Intro line.

## Install

Run the installer.
```
# not a heading inside a fence
```

## Use

Call it.
"""

CODE = '''import os


def alpha(x):
    """Add one."""
    return x + 1


class Beta:
    def one(self):
        return 1

    @property
    def two(self):
        return 2
'''


class WordTokenizer:
    """One token per whitespace-separated word, plus BOS/EOS, like the real API."""

    def encode(self, texts, max_len):
        ids, cut = [], []
        for text in texts:
            words = list(range(len(text.split())))
            cut.append(len(words) + 2 > max_len)
            ids.append([1] + words[:max_len - 2] + [2])
        return ids, cut


class WordEmbedder:
    max_tokens = 40
    tokenizer = WordTokenizer()


def lines_of(text: str, chunk) -> list[str]:
    return text.split("\n")[chunk.start_line - 1:chunk.end_line]


def test_markdown_headings_become_titles_and_sections_never_mix() -> None:
    chunks = Chunker(chunk_chars=400).chunk_text(MARKDOWN, "docs/guide.md")
    assert [c.title for c in chunks] == ["Guide", "Guide > Install", "Guide > Use"]
    assert chunks[1].text.startswith("## Install")
    assert "# not a heading" in chunks[1].text  # fenced code is not a heading
    for chunk in chunks:
        assert chunk.text == "\n".join(lines_of(MARKDOWN, chunk))


def test_code_splits_at_def_and_class_with_symbol_titles() -> None:
    chunks = Chunker(chunk_chars=90, overlap_chars=20).chunk_text(CODE, "pkg/mod.py")
    starts = [c.text.split("\n")[0] for c in chunks]
    assert starts == ["import os", "class Beta:", "    @property"]  # decorator kept with def
    assert chunks[0].end_line == 6  # alpha whole, not cut before its return
    assert [c.title for c in chunks] == ["mod.py", "mod.py: Beta", "mod.py: Beta.two"]
    small = Chunker(chunk_chars=60, overlap_chars=0).chunk_text(CODE, "pkg/mod.py")
    assert [c.title for c in small][:2] == ["mod.py", "mod.py: alpha"]
    assert small[1].text.startswith("def alpha(x):")


def test_running_text_gets_overlap_and_every_line_is_covered() -> None:
    text = "\n".join(f"Sentence {i} of the running text goes here." for i in range(40))
    chunks = Chunker(chunk_chars=240, overlap_chars=60).chunk_text(text, "notes.txt")
    assert len(chunks) > 3
    assert all(len(c.text) <= 240 for c in chunks)
    assert chunks[0].start_line == 1 and chunks[-1].end_line == 40
    for before, after in zip(chunks, chunks[1:]):
        assert after.start_line <= before.end_line  # overlap
        assert after.start_line > before.start_line  # progress
    assert all(c.title == "notes.txt" for c in chunks)


def test_token_budget_uses_the_tokenizer_and_splits_long_lines() -> None:
    text = "intro\n\n" + " ".join(f"w{i}" for i in range(300)) + "\n\nend"
    chunker = Chunker(WordEmbedder(), chunk_tokens=512, overlap_tokens=4)
    assert chunker.size == 40  # capped by the model's largest bucket
    chunks = chunker.chunk_text(text, "long.txt")
    tokenizer = WordEmbedder.tokenizer
    for chunk in chunks:
        _, cut = tokenizer.encode([f"title: {chunk.title} | text: {chunk.text}"], 40)
        assert not cut[0], chunk
    joined = " ".join(c.text for c in chunks if c.start_line == 3)
    assert all(f"w{i}" in joined.split() for i in range(300))  # nothing lost
    assert chunks[0].text == "intro" and chunks[-1].text.endswith("\n\nend")
    assert chunks[-1].end_line == 5


def test_empty_and_blank_texts_give_no_chunks() -> None:
    assert Chunker().chunk_text("", "a.txt") == []
    assert Chunker().chunk_text("\n  \n\n", "a.txt") == []


def test_windows_newlines_keep_line_numbers() -> None:
    chunks = Chunker(chunk_chars=30, overlap_chars=0).chunk_text(
        "one\r\ntwo\r\n\r\nthree three three three\r\n", "w.txt")
    assert (chunks[0].start_line, chunks[-1].end_line) == (1, 4)
    assert "\r" not in "".join(c.text for c in chunks)


def test_skips_binary_large_and_non_utf8_files(tmp_path: Path, caplog) -> None:
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "big.txt").write_text("x" * 2000)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    reasons = {}
    for name in ("bin.txt", "big.txt", "latin.txt"):
        with pytest.raises(SkipFile) as info:
            load_text_file(tmp_path / name, max_bytes=1000)
        reasons[name] = str(info.value)
    assert "binary" in reasons["bin.txt"]
    assert "2000 bytes" in reasons["big.txt"] and "1000" in reasons["big.txt"]
    assert "UTF-8" in reasons["latin.txt"]
    with caplog.at_level(logging.INFO, logger="gemma_edge.device"):
        assert Chunker(max_file_bytes=1000).chunk_file(tmp_path / "big.txt") == []
    assert "skipped big.txt" in caplog.text


def test_iter_files_globs_and_hidden_dirs(tmp_path: Path) -> None:
    for rel in ("a.md", "src/b.py", "src/c.bin", ".git/d.md", "node_modules/e.md",
                ".hidden.md", "docs/f.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    found = [rel for _, rel in iter_files(tmp_path)]
    assert found == ["a.md", "docs/f.txt", "src/b.py"]
    assert [rel for _, rel in iter_files(tmp_path, parse_globs("docs/*.txt, *.py"))] == [
        "docs/f.txt", "src/b.py"]
    assert [rel for _, rel in iter_files(tmp_path, exclude=[tmp_path / "a.md"])] == [
        "docs/f.txt", "src/b.py"]


def test_file_kind() -> None:
    assert file_kind("x/README.md") == "markdown"
    assert file_kind("x/run.py") == "code"
    assert file_kind("x/notes.TXT") == "text"
