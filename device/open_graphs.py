"""The graphs an Embedder runs: the backend, one Runner per bucket, the open graph files.

``Embedder`` asks ``OpenGraphs.runner(seq_len)`` for a bucket's ``Runner``. Three kinds
share that protocol:

- ``runtime.GraphRunner``: one signature of a graph file through the TFLite Interpreter
  (the CPU with XNNPACK, or the Edge TPU delegate for compiled graphs);
- ``weight_cache.WeightCachedRunner``: the same through LiteRT's CompiledModel with
  XNNPACK's weight cache file (CPU, ai-edge-litert only; preferred when available);
- ``segment_host.SegmentRunner``: a bucket's full-int8 segments and the host loop.

Open graph files are kept least recently used first, at most ``max_open`` of them (a
bucket's segments count as one): XNNPACK keeps a packed copy of each open graph's
weights (~110 MB per int8 bucket), which bounds RAM on small boards.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from gemma_edge.errors import ArtifactError, EdgeTpuUnavailableError, InputError
from gemma_edge.graph_entries import EDGETPU_COMPILED, PRECISION_ROLE, GraphEntry, entries_for, entry_for

from .runtime import GraphRunner, first_line, interpreter_api
from .weight_cache import (
    WeightCachedGraphs,
    WeightCachedRunner,
    compiled_model_api,
    default_cache_dir,
    writable_dir,
)

if sys.version_info >= (3, 8):
    from typing import Protocol
else:  # the Coral Dev Board's Python 3.7: the protocol is documentation there
    Protocol = object

log = logging.getLogger("gemma_edge.device")


class Runner(Protocol):
    """One bucket's graph: token rows, mask and pooling matrix in, [slots, D] vectors out."""

    def run(self, embeddings: np.ndarray, mask: np.ndarray, pool: np.ndarray) -> np.ndarray:
        ...


class OpenGraphs:
    """The backend and graph role an Embedder runs, and its open graphs.

    ``backend``: "cpu", "edgetpu" or "auto" (the Edge TPU if one answers and the artifacts
    are compiled for it, else the CPU); ``precision``: "float", "int8" or "full-int8" (the
    role each runs: ``graph_entries.PRECISION_ROLE``). After construction ``backend`` and
    ``role`` say what was chosen and ``reason`` why.
    """

    def __init__(self, art_dir: Path, manifest: dict[str, Any], verifier: Any, backend: str,
                 precision: str, num_threads: int, device: Optional[str],
                 weight_cache: Union[str, Path, bool, None], max_open: Optional[int]):
        self.art_dir, self.manifest, self.verifier = art_dir, manifest, verifier
        self.num_threads, self.device, self.max_open = num_threads, device, max_open
        self.hidden = int(manifest["model"]["hidden_size"])
        # open files (or a bucket's segments) in least-recently-used order, and per bucket
        # the key of the file its runner reads plus the runner
        self._files: dict[str, Any] = {}
        self._runners: dict[int, tuple[str, Runner]] = {}
        self.backend, self.role, self.reason = self._choose(backend, precision)
        self.weight_cache = self._weight_cache(weight_cache) if self.backend == "cpu" else None
        entries = entries_for(manifest, self.role)
        self.slots = entries[0].pool_slots
        self.buckets = sorted({s for e in entries for s in e.seq_lens})
        self.segmented = any(e.is_segments for e in entries)

    # -- what is open ----------------------------------------------------------------------
    @property
    def open_files(self) -> list[str]:
        """The open graph files, least recently used first (a bucket's segments: "host.npz#T")."""
        return list(self._files)

    @property
    def runners(self) -> dict[int, Runner]:
        """The runners of the buckets whose files are open."""
        return {seq_len: runner for seq_len, (_, runner) in self._runners.items()}

    def file_of(self, seq_len: int) -> str:
        """The graph file an open bucket runs (a segment bucket: its host constants)."""
        return self._runners[seq_len][0].split("#")[0]

    # -- the backend -------------------------------------------------------------------------
    def _choose(self, backend: str, precision: str) -> tuple[str, str, str]:
        compiled = entries_for(self.manifest, EDGETPU_COMPILED)
        if backend in ("auto", "edgetpu") and precision != "float":
            if not compiled:
                if backend == "edgetpu":
                    raise ArtifactError(f"{self.art_dir}: no compiled Edge TPU graph; run "
                                        "`gemma-edge compile` on the workstation first")
                reason = "no compiled Edge TPU graph in the artifacts"
            else:
                try:  # open one graph (of segments: the first) to probe for a device
                    self.open_interpreter(compiled[0].graph_files[0], backend="edgetpu")
                    return "edgetpu", EDGETPU_COMPILED, "Edge TPU found"
                except EdgeTpuUnavailableError as exc:
                    if backend == "edgetpu":
                        raise
                    reason = str(exc).split(" (")[0]
        elif backend == "edgetpu":
            raise InputError("precision='float' cannot run on the Edge TPU (8-bit only); use "
                             "precision='int8' or backend='cpu'")
        else:
            reason = "requested" if backend == "cpu" else "float precision runs on the CPU"
        role = PRECISION_ROLE[precision]
        if not entries_for(self.manifest, role):
            raise ArtifactError(f"{self.art_dir}: no {role!r} graph for precision "
                                f"{precision!r}; re-export with a gemma-edge version "
                                "that builds it (`gemma-edge export` makes every graph)")
        return "cpu", role, reason

    def _weight_cache(self, weight_cache: Union[str, Path, bool, None]
                      ) -> Optional[WeightCachedGraphs]:
        """The CompiledModel opener with a weight cache, or None (Interpreter path) when
        it is off, the runtime lacks the API or the cache directory is not writable."""
        if weight_cache is False:
            return None
        api = compiled_model_api()
        if api is None:
            return None
        cache_dir = default_cache_dir() if weight_cache in (None, True) else Path(weight_cache)
        if not writable_dir(cache_dir):
            log.warning("gemma-edge: weight cache %s is not writable; graphs are packed in "
                        "memory at each open (set GEMMA_EDGE_CACHE_DIR)", cache_dir)
            return None
        try:
            return WeightCachedGraphs(api, cache_dir, self.num_threads)
        except Exception as exc:  # noqa: BLE001 - a broken LiteRT install: the Interpreter still runs
            log.warning("gemma-edge: LiteRT CompiledModel unavailable (%s); graphs are packed "
                        "in memory at each open", exc)
            return None

    # -- opening -----------------------------------------------------------------------------
    def open_interpreter(self, path: str, cache: bool = True,
                         backend: Optional[str] = None) -> Any:
        """The interpreter of the artifacts file ``path`` on ``backend`` (default: the chosen
        one), verified at its first open; kept among the open files unless ``cache`` is off
        (segments: their runner holds them)."""
        if path in self._files:
            return self._files[path]
        self.verifier.check(path)
        if (backend or self.backend) == "edgetpu":
            from .edgetpu import make_edgetpu_interpreter

            interp = make_edgetpu_interpreter(self.art_dir / path, device=self.device,
                                              num_threads=self.num_threads)
        else:
            Interpreter, _, _ = interpreter_api()
            try:
                interp = Interpreter(model_path=str(self.art_dir / path),
                                     num_threads=self.num_threads)
            except (ValueError, RuntimeError) as exc:
                hint = (" It is compiled for the Edge TPU; run it with backend='edgetpu'."
                        if "edgetpu-custom-op" in str(exc) else "")
                raise ArtifactError(f"{self.art_dir / path}: the TFLite runtime cannot load "
                                    f"it ({first_line(exc)}).{hint}") from exc
        if cache:
            self._files[path] = interp
        return interp

    def _cacheable(self, entry: GraphEntry) -> bool:
        """Runs through the weight cache: float-I/O CPU graphs listed in the manifest."""
        return (self.weight_cache is not None and entry.float_io
                and entry.path in self.manifest.get("files", {}))

    def _entry_for(self, seq_len: int) -> Optional[GraphEntry]:
        """The entry that runs ``seq_len``: for int8 through the weight cache the one-file
        export of every bucket ("int8-shared": its weights are packed once for all
        buckets), else the role's own (per-bucket files for the Interpreter, which would
        pack a multi-signature file once per signature)."""
        if self.role == "int8":
            shared = entry_for(self.manifest, "int8-shared", seq_len)
            if shared is not None and self._cacheable(shared):
                return shared
        return entry_for(self.manifest, self.role, seq_len)

    def runner(self, seq_len: int) -> Runner:
        """The Runner of the ``seq_len``-token bucket, opening its file (and closing the
        least recently used beyond ``max_open``) when it is not open."""
        if seq_len in self._runners:  # mark its file most recently used (dicts keep order)
            key, runner = self._runners[seq_len]
            self._files[key] = self._files.pop(key)
            return runner
        entry = self._entry_for(seq_len)
        if entry is None:
            raise ArtifactError(f"no {self.role} graph for {seq_len} tokens")
        if entry.is_segments:
            return self._segment_runner(entry, seq_len)
        self._evict_for(entry.path)
        signature = entry.signature_for(seq_len)
        if self.weight_cache is not None and self._cacheable(entry):
            return self._weight_cached_runner(self.weight_cache, entry, seq_len, signature)
        interp = self.open_interpreter(entry.path)
        # On the CPU the packed weights live in XNNPACK's buffers; the Edge TPU streams
        # parameters from the mapped file on every call, so its pages must stay.
        release = self.art_dir / entry.path if self.backend == "cpu" else None
        runner = GraphRunner(interp, signature, seq_len, self.hidden, self.slots,
                             release_after_first_run=release)
        self._runners[seq_len] = (entry.path, runner)
        return runner

    def _weight_cached_runner(self, cache: WeightCachedGraphs, entry: GraphEntry, seq_len: int,
                              signature: Optional[str]) -> WeightCachedRunner:
        model = self._files.get(entry.path)
        if model is None:
            # the weight cache is named by the file's verified hash (None: not verified)
            sha = self.verifier.check(entry.path)
            model = cache.open(self.art_dir / entry.path, sha,
                               self.manifest["files"][entry.path]["sha256"])
            self._files[entry.path] = model
        if signature is None:
            signature = next(iter(model.get_signature_list()))
        runner = WeightCachedRunner(model, signature, seq_len, self.hidden, self.slots)
        self._runners[seq_len] = (entry.path, runner)
        return runner

    def _segment_runner(self, entry: GraphEntry, seq_len: int) -> Runner:
        """The per-layer int8 segments of one bucket (export/segments/), one open-file slot."""
        from .segment_host import SegmentRunner

        key = f"{entry.path}#{seq_len}"
        self._evict_for(key)
        self.verifier.check(entry.path)  # the host constants; each segment at its open

        def open_graph(path: Path) -> Any:  # the runner holds its segments: one slot
            return self.open_interpreter(str(path.relative_to(self.art_dir)), cache=False)

        runner = SegmentRunner(self.art_dir, entry, seq_len, open_graph)
        self._files[key] = runner
        self._runners[seq_len] = (key, runner)
        return runner

    def _evict_for(self, key: str) -> None:
        """Close least recently used files until ``key`` fits under ``max_open``."""
        if not self.max_open or key in self._files:
            return
        while len(self._files) >= self.max_open:
            oldest = next(iter(self._files))
            for seq_len in [t for t, (k, _) in self._runners.items() if k == oldest]:
                del self._runners[seq_len]
            del self._files[oldest]
