"""``Embedder``: text in, L2-normalised EmbeddingGemma vectors out, on the device.

Host side of every inference: prompt, tokenise, choose a bucket (or pack short
texts together), read their rows from the on-disk table, run the graph, then
MRL-truncate and re-normalise. The graph does the encoder, pooling, both Dense
layers and the L2 norm.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from gemma_edge.errors import ArtifactError, InputError
from gemma_edge.graph_entries import EDGETPU_COMPILED, entries_for
from gemma_edge.manifest import artifact_id, load_manifest

from .open_graphs import OpenGraphs, Runner
from .packing import bucket_inputs, pack_greedy
from .runtime import default_threads
from .table import EmbeddingTable
from .tokenizer import TextTokenizer
from .verify import FileVerifier
from .weight_cache import default_cache_dir, writable_dir

log = logging.getLogger("gemma_edge.device")

BACKENDS = ("auto", "cpu", "edgetpu")
PRECISIONS = ("auto", "float", "int8", "full-int8")
Texts = Union[str, Sequence[str]]


# Every graph (or the segments' host loop) ends in an L2 norm: a vector further than this
# from unit length was not computed (an all-zero output). Loose enough for a graph whose
# int8 output is dequantised (steps of 1/128 per element).
UNIT_NORM_TOLERANCE = 0.05


class Embedder:
    """Embed texts with an exported EmbeddingGemma (see ``gemma-edge export``).

    backend: "cpu" (TFLite on the CPU, XNNPACK), "edgetpu" (compiled graph on a
    Coral device) or "auto" (Edge TPU if present and compiled for, else CPU).
    precision: "float" (exact float32 export), "int8" (the fastest int8 graph for
    the backend) or "full-int8" (the fully int8 Edge TPU graph; on the CPU this
    emulates what the Edge TPU computes). "auto" (the default) is "int8" when the
    artifacts have int8 graphs (cosine ~0.998 to float, 2-4x faster), else "float".
    num_threads: CPU interpreter threads; default: the usable cores, at most 4.
    pack_tokens: short texts in one call are packed together into buckets of up
    to this many tokens (block-diagonal attention); 0 disables packing. Default
    256; for the full-int8 segments the smallest bucket (64), whose segments are the
    most exact, and no short texts ride along with a long one.
    max_open_graphs: keep at most this many per-bucket graph files open (least
    recently used closed first). XNNPACK keeps a packed copy of each open graph's
    weights (~110 MB per int8 bucket), so this bounds RAM on small boards at the
    cost of re-opening a graph when a call switches buckets (~0.03 s with the weight
    cache, ~0.3 s without). Graphs sharing one multi-signature file (the float
    export) count as one.
    weight_cache: directory for XNNPACK's packed-weight cache files (CPU graphs,
    ai-edge-litert only; see device/weight_cache.py): None means ``$GEMMA_EDGE_CACHE_DIR``
    or ``~/.cache/gemma-edge``, False disables it. The first open of a bucket packs
    its weights into a file there (~110 MB per int8 bucket, ~450 MB for the float
    graph); later opens map it, and memory peaks at one copy of the weights, not two.
    verify_files: check each artifact file against the manifest's SHA-256 at its first
    open (True, the default; see device/verify.py: hashed once, then remembered by its
    stat in the cache folder, so later opens cost a stat()); False skips the hashing
    (boards that must start fast; sizes are still checked).
    """

    def __init__(self, artifacts: Union[str, Path], backend: str = "auto",
                 precision: str = "auto", num_threads: Optional[int] = None,
                 device: Optional[str] = None, pack_tokens: Optional[int] = None,
                 max_open_graphs: Optional[int] = None, verify_files: bool = True,
                 weight_cache: Union[str, Path, bool, None] = None):
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        num_threads = _int_option("num_threads", num_threads, 1, "None: the usable cores")
        pack_tokens = _int_option("pack_tokens", pack_tokens, 0, "0: no packing")
        self.max_open_graphs = _int_option("max_open_graphs", max_open_graphs, 1, "None: no limit")
        self.art_dir = Path(artifacts)
        self.manifest = load_manifest(self.art_dir)
        self.verifier = FileVerifier(self.art_dir, self.manifest["files"], verify_files,
                                     _state_dir(weight_cache))
        if precision == "auto":
            has_int8 = any(entries_for(self.manifest, r) for r in ("int8", EDGETPU_COMPILED))
            precision = "int8" if has_int8 else "float"
        model = self.manifest["model"]
        self.hidden = int(model["hidden_size"])
        self.output_dim = int(model["output_dim"])
        self.mrl_dims = [int(d) for d in model["mrl_dims"]]
        self.prompts: dict[str, str] = dict(self.manifest.get("prompts", {}))
        self.precision = precision
        self.num_threads = num_threads or default_threads()
        self.device = device
        self.verifier.check(self.manifest["tokenizer"]["file"])
        self.tokenizer = TextTokenizer(self.art_dir, self.manifest["tokenizer"])
        # Seconds spent per stage (tokenize, lookup, invoke, post): read by `gemma-edge bench`.
        self.stage_seconds: Counter = Counter()
        self.graphs = OpenGraphs(self.art_dir, self.manifest, self.verifier, backend, precision,
                                 self.num_threads, device, weight_cache, self.max_open_graphs)
        self.backend, self.graph_role = self.graphs.backend, self.graphs.role
        log.info("gemma-edge: %s backend, %s graph (%s)", self.backend, self.graph_role,
                 self.graphs.reason)
        self.slots = self.graphs.slots
        self.buckets = self.graphs.buckets
        self.max_tokens = self.buckets[-1]
        # The full-int8 segments of a larger bucket are less exact (real model: a query in
        # the 256-token segments 0.966-0.974 to float, in the 64-token ones 0.980-0.982;
        # docs/quantization.md), so there texts are packed only into the smallest bucket
        # and a long text carries no short ones.
        segmented = self.graphs.segmented
        default_pack = self.buckets[0] if segmented else 256
        self.pack_tokens = min(self.max_tokens,
                               default_pack if pack_tokens is None else pack_tokens)
        self.carry_short = not segmented
        table_kind = "float" if self.graph_role == "float" else "int8"
        tables = self.manifest["embedding_tables"]
        spec = tables.get(table_kind) or tables["float"]
        for key in ("path", "scales"):
            if spec.get(key):
                self.verifier.check(spec[key])
        self.table = EmbeddingTable(self.art_dir, spec)

    def runner(self, seq_len: int) -> Runner:
        """The graph that runs the ``seq_len``-token bucket (opened on first use)."""
        return self.graphs.runner(seq_len)

    # -- embedding ---------------------------------------------------------------------
    @property
    def artifact_id(self) -> str:
        """The exported model's id (``manifest.artifact_id``): search indexes record it."""
        return artifact_id(self.manifest)

    def bucket_for(self, n_tokens: int) -> int:
        """The smallest bucket that holds ``n_tokens``; an InputError beyond the largest."""
        for b in self.buckets:
            if n_tokens <= b:
                return b
        raise InputError(f"{n_tokens} tokens exceed the largest bucket {self.max_tokens}")

    def plan(self, lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(bucket, text indices) runs; short texts share a bucket when packing is on.

        A text longer than ``pack_tokens`` runs in its own bucket, and the tokens it
        leaves free there carry short texts (largest first), which a run of its own
        would otherwise pay for; the remaining short texts are packed first-fit
        decreasing into ``pack_tokens``.
        """
        if self.pack_tokens <= 0 or len(lengths) == 1 or self.slots == 1:
            return [(self.bucket_for(n), [i]) for i, n in enumerate(lengths)]
        long_ones = sorted((i for i, n in enumerate(lengths) if n > self.pack_tokens),
                           key=lambda i: -lengths[i])
        short = sorted((i for i, n in enumerate(lengths) if n <= self.pack_tokens),
                       key=lambda i: -lengths[i])
        runs = []
        for i in long_ones:
            bucket = self.bucket_for(lengths[i])
            members, free = [i], bucket - lengths[i]
            for j in list(short) if self.carry_short else []:
                if len(members) == self.slots:
                    break
                if lengths[j] <= free:
                    members.append(j)
                    free -= lengths[j]
                    short.remove(j)
            runs.append((bucket, members))
        for group in pack_greedy([lengths[i] for i in short], self.pack_tokens, self.slots):
            members = [short[k] for k in group]
            runs.append((self.bucket_for(sum(lengths[i] for i in members)), members))
        return runs

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of ``texts`` (prompts already in them), cut to the largest bucket with a
        warning naming how many were cut: what ``encode`` embeds."""
        t0 = time.perf_counter()
        ids, truncated = self.tokenizer.encode(texts, self.max_tokens)
        self.stage_seconds["tokenize"] += time.perf_counter() - t0
        if any(truncated):
            longest = max([int(b) for b in self.manifest.get("buckets", [])] or [0])
            hint = (f" (the {self.graph_role} graphs stop there; precision 'int8' or 'float' "
                    f"takes up to {longest})" if longest > self.max_tokens else "")
            log.warning("%d of %d texts exceed %d tokens and were truncated%s",
                        sum(truncated), len(texts), self.max_tokens, hint)
        return ids

    def embed_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Full-dimension embeddings [n, D] for already tokenised texts."""
        out = np.zeros((len(token_ids), self.output_dim), dtype=np.float32)
        lengths = [len(ids) for ids in token_ids]
        clock = time.perf_counter
        for seq_len, members in sorted(self.plan(lengths), key=lambda run: run[0]):
            runner = self.runner(seq_len)  # opened lazily: not part of the timed stages
            t0 = clock()
            rows, mask, pool = bucket_feed(self.table, [token_ids[i] for i in members], seq_len,
                                           self.hidden, self.slots)
            t1 = clock()
            result = runner.run(rows, mask, pool)[:len(members)]
            self._check_finite(result, seq_len)
            out[members] = result
            self.stage_seconds["lookup"] += t1 - t0
            self.stage_seconds["invoke"] += clock() - t1
        return out

    def _check_finite(self, result: np.ndarray, seq_len: int) -> None:
        """Never hand out a non-finite or non-unit vector: artifacts of a NaN checkpoint
        gave all-NaN vectors, and the int8 graph under tflite-runtime on an emulated
        arm64 board all-zero ones (docs/board-check.md). Every graph ends in the L2 norm,
        so a vector whose norm is not ~1 was not computed. Written so that NaN fails."""
        graph = self.graphs.file_of(seq_len)
        finite = np.isfinite(result).all(axis=1)
        if not finite.all():
            raise ArtifactError(
                f"{self.art_dir}: the {self.graph_role} graph {graph} "
                f"(bucket {seq_len}) returned NaN or inf for {int((~finite).sum())} of "
                f"{len(result)} texts; the artifacts are broken (e.g. exported from a checkpoint "
                "with NaN weights): re-export from a healthy checkpoint")
        unit = np.abs(np.linalg.norm(result, axis=1) - 1.0) <= UNIT_NORM_TOLERANCE
        if not unit.all():
            raise ArtifactError(
                f"{self.art_dir}: the {self.graph_role} graph {graph} (bucket {seq_len}) returned "
                f"{int((~unit).sum())} of {len(result)} vectors that are not unit length (an "
                "all-zero vector: the runtime computed nothing); this TFLite runtime cannot run "
                "this graph here: try another runtime or precision (docs/board-check.md)")

    def _check_dim(self, dim: Optional[int]) -> int:
        if dim is None:
            return self.output_dim
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise InputError(f"dim must be an int, got {type(dim).__name__} {dim!r}; the "
                             f"Matryoshka dims of this model are {', '.join(map(str, self.mrl_dims))}")
        if dim not in self.mrl_dims:
            raise InputError(f"dim {dim} is not supported: Matryoshka dims of this model are "
                             f"{', '.join(map(str, self.mrl_dims))}")
        return int(dim)

    def encode(self, texts: Texts, prompt_name: Optional[str] = None,
               prompt: Optional[str] = None, dim: Optional[int] = None) -> np.ndarray:
        """float32 [n, dim] L2-normalised. ``prompt`` (literal) wins over ``prompt_name``.

        An empty string is embedded as its prompt alone (as sentence-transformers
        does); text longer than the largest bucket is truncated with a warning.
        """
        dim = self._check_dim(dim)
        texts = _as_list(texts)
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InputError(f"prompt {prompt_name!r} unknown; this model has "
                                 f"{', '.join(sorted(self.prompts))}")
            prompt = self.prompts[prompt_name]
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        vectors = self.embed_ids(self.tokenize([(prompt or "") + t for t in texts]))
        t1 = time.perf_counter()
        vectors = truncate_dim(vectors, dim)
        self.stage_seconds["post"] += time.perf_counter() - t1
        return vectors

    def encode_query(self, texts: Texts, dim: Optional[int] = None) -> np.ndarray:
        """``encode`` with EmbeddingGemma's query prompt ("task: search result | query: ")."""
        return self.encode(texts, prompt_name="query", dim=dim)

    def encode_document(self, texts: Texts, dim: Optional[int] = None,
                        title: Union[None, str, Sequence[Optional[str]]] = None) -> np.ndarray:
        """Documents use EmbeddingGemma's "title: {title | none} | text: " prompt."""
        texts = _as_list(texts)
        if title is None or isinstance(title, str):
            titles = [title] * len(texts)
        else:
            titles = list(title)
            if len(titles) != len(texts):
                raise InputError(f"{len(titles)} titles for {len(texts)} texts")
        full = [document_text(x, t) for t, x in zip(titles, texts)]
        return self.encode(full, prompt="", dim=dim)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] of normalised embeddings."""
        a, b = np.atleast_2d(a), np.atleast_2d(b)
        if a.shape[1] != b.shape[1]:
            raise InputError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
        return a @ b.T


def bucket_feed(table: EmbeddingTable, group: Sequence[Sequence[int]], seq_len: int,
                hidden: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph inputs of one bucket run: the token rows of the texts in ``group`` one
    after the other ([1, seq_len, hidden] float32, zero padding), the block-diagonal mask
    and the pooling matrix (``packing.bucket_inputs``). The export's calibration builds
    its samples with it too, so they are what the device feeds."""
    rows = np.zeros((1, seq_len, hidden), dtype=np.float32)
    start = 0
    for ids in group:
        rows[0, start:start + len(ids)] = table.lookup(ids)
        start += len(ids)
    mask, pool = bucket_inputs([len(ids) for ids in group], seq_len, slots)
    return rows, mask, pool


def document_text(text: str, title: Optional[str] = None) -> str:
    """A document with EmbeddingGemma's document prompt, as ``encode_document`` embeds it."""
    return f"title: {title or 'none'} | text: {text}"


def truncate_dim(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dim`` values, then re-normalise."""
    cut = np.ascontiguousarray(vectors[:, :dim], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def _as_list(texts: Texts) -> list[str]:
    """``texts`` as a list of valid Unicode strings, else an InputError naming the bad one."""
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
        raise InputError(f"texts must be a string or a sequence of strings, got "
                         f"{type(texts).__name__}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # the tokenizers raise a bare TypeError on these
            raise InputError(f"text {i}: not valid Unicode (lone surrogate "
                             f"{ascii(text[exc.start])} at character {exc.start}); fix or drop "
                             "that text") from exc
    return texts


def _int_option(name: str, value: Any, minimum: int, none_means: str) -> Optional[int]:
    """An integer option of at least ``minimum`` (None passes), else a one-line InputError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an int, got {type(value).__name__} {value!r} "
                         f"({none_means})")
    if value < minimum:
        raise InputError(f"{name} {value}: at least {minimum} ({none_means})")
    return int(value)


def _state_dir(weight_cache: Union[str, Path, bool, None]) -> Optional[Path]:
    """Where the verified-hash record goes: the weight cache's folder when one is given,
    else the default cache folder; None when it cannot be created (then each start hashes)."""
    folder = Path(weight_cache) if isinstance(weight_cache, (str, Path)) else default_cache_dir()
    return folder if writable_dir(folder) else None
