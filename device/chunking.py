"""Split text, markdown and code files into chunks that fit the embedding model.

Why: the exported graphs see at most ``Embedder.max_tokens`` tokens (the largest
bucket) and anything longer is truncated, so a long file embedded whole loses its
tail. Chunks are cut at the most natural boundary that fits the budget (markdown
heading > def/class > blank line > any line), consecutive chunks of running text
share a few lines of overlap so a sentence cut in two is still findable, and every
chunk keeps its 1-based line range so a search hit points back into the file.

Budgets are counted in tokens with the model's own tokenizer when an Embedder is
given (exact for the bucket limit), else in characters (no tokenizer needed).
Standard library only, plus the Embedder passed in; runs on Python 3.7.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

log = logging.getLogger("gemma_edge.device")

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdx"})
CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".sh", ".bash", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".tsx",
    ".jsx", ".go", ".rs", ".java", ".kt", ".swift", ".rb", ".php", ".lua", ".scala", ".cs",
})
DEFAULT_GLOBS = ("*.md", "*.markdown", "*.txt", "*.rst") + tuple(
    "*" + s for s in sorted(CODE_SUFFIXES)) + ("*.toml", "*.yaml", "*.yml", "*.ini", "*.cfg")
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "build", "dist"})
MAX_FILE_BYTES = 1000000
CHUNKER_VERSION = 1  # bump when chunk boundaries change: stores then re-embed every file

HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
SYMBOL = re.compile(r"^(\s*)(?:export\s+)?(?:pub(?:\([\w:]+\))?\s+)?(?:async\s+)?"
                    r"(def|class|function|func|fn|struct|enum|impl|trait|interface)\s+"
                    r"([A-Za-z_][\w.]*)")
LEAD_IN = ("@", "#", "//", "/*", "*")  # decorators and comments stay with the def below

# break priorities: a chunk ends before a line of the highest priority that fits
NONE, PARAGRAPH, NESTED_DEF, TOP_DEF = 0, 1, 2, 3


@dataclass
class Chunk:
    """One embeddable piece of a file; lines are 1-based and inclusive."""

    path: str
    start_line: int
    end_line: int
    title: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SkipFile(Exception):
    """A file that is not indexed (binary, too large, unreadable); str() is the reason."""


def file_kind(path: str) -> str:
    """"markdown", "code" or "text", from the file name."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    return "code" if suffix in CODE_SUFFIXES else "text"


def load_text_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[str, bytes]:
    """(text, raw bytes) of a UTF-8 text file; raises SkipFile saying why it is not one."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SkipFile(f"{size} bytes, over the {max_bytes}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise SkipFile(f"unreadable ({exc.strerror or exc})") from exc
    if b"\x00" in data[:8192]:
        raise SkipFile("binary (NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SkipFile("not UTF-8 text") from None
    return text, data


def parse_globs(text: Optional[str]) -> tuple[str, ...]:
    """'*.md,*.py docs/*.txt' -> patterns; None or empty -> DEFAULT_GLOBS."""
    patterns = tuple(p for p in re.split(r"[,\s]+", text or "") if p)
    return patterns or DEFAULT_GLOBS


def matches(rel: str, globs: Sequence[str]) -> bool:
    """A pattern with a '/' matches the relative path, one without matches the file name."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel if "/" in g else name, g) for g in globs)


def iter_files(root: Path, globs: Sequence[str] = DEFAULT_GLOBS,
               exclude: Sequence[Path] = ()) -> Iterator[tuple[Path, str]]:
    """(path, relative posix path) of matching files, sorted, hidden and build dirs skipped."""
    excluded = {os.path.abspath(str(p)) for p in exclude}
    for folder, dirs, names in os.walk(str(root)):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(names):
            full = os.path.join(folder, name)
            if name.startswith(".") or os.path.abspath(full) in excluded:
                continue
            rel = Path(os.path.relpath(full, str(root))).as_posix()
            if matches(rel, globs) and os.path.isfile(full):
                yield Path(full), rel


@dataclass
class _Unit:
    line: int  # 0-based source line
    text: str
    cost: int
    brk: int  # priority of ending a chunk before this unit
    hard: bool  # a chunk must end before this unit (markdown heading)
    title: str
    glued: bool = False  # continues the previous unit's line (a long line split in pieces)


class Chunker:
    """Turns text into Chunks that fit one model call.

    embedder: when given, budgets are in its tokens and capped by its ``max_tokens``
    (the "title: ... | text: " document prompt included); else in characters.
    """

    def __init__(self, embedder: Any = None, chunk_tokens: int = 256, overlap_tokens: int = 32,
                 chunk_chars: int = 1200, overlap_chars: int = 160,
                 max_file_bytes: int = MAX_FILE_BYTES):
        self.embedder = embedder
        self.max_file_bytes = max_file_bytes
        self._specials = 0
        if embedder is not None:
            self.size = min(int(chunk_tokens), int(embedder.max_tokens))
            self.overlap = min(int(overlap_tokens), self.size // 4)
            self._specials = len(embedder.tokenizer.encode([""], 1 << 30)[0][0])
        else:
            self.size, self.overlap = int(chunk_chars), min(int(overlap_chars), chunk_chars // 4)
        self._overhead: dict[str, int] = {}

    @property
    def settings(self) -> dict[str, Any]:
        """What decides chunk boundaries; a store re-embeds everything when it changes."""
        return {"version": CHUNKER_VERSION, "unit": "tokens" if self.embedder else "chars",
                "size": self.size, "overlap": self.overlap}

    # -- costs -------------------------------------------------------------------------
    def _costs(self, texts: Sequence[str]) -> list[int]:
        if self.embedder is None or not texts:
            return [len(t) for t in texts]
        ids, _ = self.embedder.tokenizer.encode(list(texts), 1 << 30)
        return [len(x) - self._specials for x in ids]

    def _budget(self, title: str) -> int:
        if title not in self._overhead:
            prompt = f"title: {title} | text: "
            self._overhead[title] = self._costs([prompt])[0] + self._specials + 1
        return max(8, self.size - self._overhead[title])

    # -- public ------------------------------------------------------------------------
    def chunk_file(self, path: Path, rel: Optional[str] = None) -> list[Chunk]:
        """Chunks of one file, or [] with the reason logged when it is skipped."""
        rel = rel or path.name
        try:
            text, _ = load_text_file(path, self.max_file_bytes)
        except SkipFile as exc:
            log.info("skipped %s: %s", rel, exc)
            return []
        return self.chunk_text(text, rel)

    def chunk_text(self, text: str, path: str, kind: Optional[str] = None) -> list[Chunk]:
        """Chunks of ``text``; ``path`` names them and picks the kind (markdown/code/text)."""
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not any(line.strip() for line in lines):
            return []
        units = self._units(lines, kind or file_kind(path), Path(path).name)
        chunks = []
        for start, end in self._pack(units):
            chunk = self._make_chunk(units[start:end], path)
            if chunk is not None:
                chunks.extend(self._fit(chunk))
        return chunks

    # -- structure ---------------------------------------------------------------------
    def _units(self, lines: list[str], kind: str, name: str) -> list[_Unit]:
        brk, hard, titles = _structure(lines, kind, name)
        costs = [c + 1 for c in self._costs(lines)]  # +1: the newline
        units: list[_Unit] = []
        for i, line in enumerate(lines):
            unit = _Unit(i, line, costs[i], brk[i], hard[i], titles[i])
            budget = self._budget(unit.title)
            if unit.cost <= budget:
                units.append(unit)
                continue
            width = max(16, int(len(line) * budget * 0.8 / unit.cost))
            for k, piece in enumerate(_wrap(line, width)):
                units.append(_Unit(i, piece, self._costs([piece])[0], brk[i] if k == 0 else NONE,
                                   hard[i] and k == 0, unit.title, glued=k > 0))
        return units

    def _pack(self, units: list[_Unit]) -> list[tuple[int, int]]:
        """Greedy [start, end) unit ranges, as full as the budget allows, cut at the best break."""
        spans: list[tuple[int, int]] = []
        start, done = 0, 0
        while done < len(units):
            budget = self._budget(units[start].title)
            end, total = start, 0
            while end < len(units) and (end == start or not units[end].hard) \
                    and (end == start or total + units[end].cost <= budget):
                total += units[end].cost
                end += 1
            if end <= done:  # the overlap left no room for new text: drop it
                start = done
                continue
            if end < len(units) and not units[end].hard:
                end = self._best_break(units, start, max(done, start) + 1, end, budget)
            spans.append((start, end))
            done = end
            while done < len(units) and not units[done].text.strip():
                done += 1  # blank lines are no new content: never start a chunk on them
            start = self._overlap_start(units, start, done)
        return spans

    @staticmethod
    def _best_break(units: list[_Unit], start: int, low: int, end: int, budget: int) -> int:
        """End of the chunk in [low, end]: the best break, discounted when the chunk is small.

        A def or heading boundary wins over a plain line unless cutting there would
        leave a nearly empty chunk; among equals the latest (fullest) cut wins.
        """
        best, best_key, filled = end, (-9, -1), 0
        for cut in range(start, end + 1):
            if cut >= low:
                penalty = 0 if filled >= budget * 0.4 else (2 if filled >= budget * 0.15 else 3)
                key = (units[cut].brk - penalty, cut)
                if key > best_key:
                    best, best_key = cut, key
            if cut < end:
                filled += units[cut].cost
        return best

    def _overlap_start(self, units: list[_Unit], start: int, end: int) -> int:
        """Where the next chunk starts: a few lines back, unless cut at a structural boundary."""
        if end >= len(units) or units[end].hard or units[end].brk >= NESTED_DEF:
            return end
        room = min(self.overlap, self._budget(units[end].title) - units[end].cost)
        begin, used = end, 0
        while begin - 1 > start and used + units[begin - 1].cost <= room:
            begin -= 1
            used += units[begin].cost
        while begin < end and not units[begin].text.strip():
            begin += 1
        return begin

    @staticmethod
    def _make_chunk(units: list[_Unit], path: str) -> Optional[Chunk]:
        while units and not units[0].text.strip():
            units = units[1:]
        while units and not units[-1].text.strip():
            units = units[:-1]
        if not units:
            return None
        parts = [units[0].text]
        for unit in units[1:]:
            parts.append(unit.text if unit.glued else "\n" + unit.text)
        return Chunk(path, units[0].line + 1, units[-1].line + 1, units[0].title, "".join(parts))

    def _fit(self, chunk: Chunk) -> list[Chunk]:
        """Halve a chunk until the real tokenizer agrees it fits (line costs are estimates)."""
        if self.embedder is None:
            return [chunk]
        full = f"title: {chunk.title} | text: {chunk.text}"
        _, truncated = self.embedder.tokenizer.encode([full], self.size)
        if not truncated[0] or len(chunk.text) < 2:
            return [chunk]
        lines = chunk.text.split("\n")
        if len(lines) > 1:
            half = len(lines) // 2
            first = Chunk(chunk.path, chunk.start_line, chunk.start_line + half - 1, chunk.title,
                          "\n".join(lines[:half]))
            second = Chunk(chunk.path, chunk.start_line + half, chunk.end_line, chunk.title,
                           "\n".join(lines[half:]))
        else:
            half = len(chunk.text) // 2
            first = Chunk(chunk.path, chunk.start_line, chunk.end_line, chunk.title,
                          chunk.text[:half])
            second = Chunk(chunk.path, chunk.start_line, chunk.end_line, chunk.title,
                           chunk.text[half:])
        return self._fit(first) + self._fit(second)


def _structure(lines: list[str], kind: str, name: str
               ) -> tuple[list[int], list[bool], list[str]]:
    """Per line: break priority before it, whether the break is mandatory, and its title."""
    n = len(lines)
    brk, hard, titles = [NONE] * n, [False] * n, [name] * n
    fence = None
    headings: list[tuple[int, str]] = []
    symbols: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        blank_before = i > 0 and not lines[i - 1].strip()
        if line.strip() and blank_before:
            brk[i] = PARAGRAPH
        if kind == "markdown":
            opener = FENCE.match(line)
            if opener and (fence is None or opener.group(1) == fence):
                fence = opener.group(1) if fence is None else None
            heading = HEADING.match(line) if fence is None and not opener else None
            if heading:
                level = len(heading.group(1))
                headings = [h for h in headings if h[0] < level] + [(level, heading.group(2))]
                brk[i], hard[i] = TOP_DEF, i > 0
            if headings:
                titles[i] = _shorten(" > ".join(h[1] for h in headings))
        elif kind == "code" and line.strip():
            indent = len(line) - len(line.lstrip())
            symbols = [s for s in symbols if s[0] < indent]
            symbol = SYMBOL.match(line)
            if symbol:
                symbols.append((indent, symbol.group(3)))
                first = i
                while first > 0 and lines[first - 1].strip().startswith(LEAD_IN):
                    first -= 1
                if first < i:
                    brk[i] = NONE
                brk[first] = max(brk[first], TOP_DEF if indent == 0 else NESTED_DEF)
            if symbols:
                titles[i] = _shorten(f"{name}: {'.'.join(s[1] for s in symbols)}")
                if symbol:
                    for j in range(first, i):  # the decorators/comments lead into this def
                        titles[j] = titles[i]
    return brk, hard, titles


def _shorten(title: str, limit: int = 100) -> str:
    return title if len(title) <= limit else title[:limit - 3] + "..."


def _wrap(line: str, width: int) -> list[str]:
    """Pieces of at most ``width`` characters, cut after whitespace when there is some."""
    pieces = []
    while len(line) > width:
        cut = line.rfind(" ", width // 2, width)
        cut = width if cut < 0 else cut + 1
        pieces.append(line[:cut])
        line = line[cut:]
    if line:
        pieces.append(line)
    return pieces
