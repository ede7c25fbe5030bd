"""CPU graphs through LiteRT's CompiledModel API with XNNPACK's file-backed weight cache.

Why: the classic ``Interpreter`` makes XNNPACK pack a graph's weights into anonymous
memory at every open (~0.3 s per int8 bucket), while the .tflite file's weight pages
are resident too, so opening an int8 bucket peaks at twice its ~110 MB of weights.
With a weight cache file (``CpuOptions.xnnpack_weight_cache_path``) XNNPACK packs once
into that file; later opens map it (~0.03 s) and never read the graph's weight pages.
Packed pages are then clean page-cache pages: the kernel may drop them under memory
pressure and processes embedding with the same artifacts share them. The graph file's
pages that LiteRT reads at open (the flatbuffer's tensor tables: ~16 MB for the
seven-signature int8 file) are released from the process after the open
(``runtime.release_file_pages``); runs do not read them again, and packing a new
cache leaves only ~2.5 MB of them resident (measured). Releasing after a run would
gain nothing: each run reads the same 4-11 MB of constants again.

Only ``ai_edge_litert`` has the API; tflite-runtime (Coral Dev Board, Pi) keeps the
Interpreter path (``runtime.GraphRunner``). Imported lazily, like every runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gemma_edge.atomic_files import atomic_write_json, sha256_file
from gemma_edge.errors import ArtifactError

from .runtime import first_line, match_inputs, release_file_pages
from .verify import read_record, stat_stamp

log = logging.getLogger("gemma_edge.device")

CACHE_ENV = "GEMMA_EDGE_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$GEMMA_EDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/gemma-edge``, else ``~/.cache/gemma-edge``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gemma-edge"


def compiled_model_api() -> Optional[dict[str, Any]]:
    """The CompiledModel classes of ai_edge_litert, or None when this runtime lacks them."""
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.environment import Environment, EnvironmentOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options
    except ImportError:
        return None
    try:
        from importlib.metadata import version  # Python >= 3.8, like ai-edge-litert itself

        runtime_version = version("ai-edge-litert")
    except Exception:  # metadata missing (vendored copy): still usable, name the cache "unknown"
        runtime_version = "unknown"
    return {"CompiledModel": CompiledModel, "CpuOptions": CpuOptions, "Options": Options,
            "Environment": Environment, "EnvironmentOptions": EnvironmentOptions,
            "HardwareAccelerator": HardwareAccelerator, "version": runtime_version}


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


class WeightCachedGraphs:
    """Opens float-I/O graph files as CompiledModels, each with its weight cache file.

    The cache file is named by the graph file's own verified SHA-256 and the runtime
    version: XNNPACK checks its own format but not which model a cache was packed from,
    so a name per verified graph content keeps a cache packed from other (or corrupted)
    weights from being used. A graph whose hash is unknown (``--no-verify`` and no
    remembered hash) gets a name of its own (the manifest's hash and the file's stat,
    marked "unverified") that a verified open never uses. A new cache is packed into a
    temporary name and renamed when complete, so an interrupted first open leaves no
    half-written cache under the final name.

    XNNPACK does not notice flipped bytes in a cache's payload (wrong vectors on every
    later run), so right after packing the cache's SHA-256, size and stat go into a
    record beside it (``NAME.json``); before each use the cache must match its record
    (stat equal, else hashed again). A cache that fails, or has no record, is deleted
    (it is this project's file) and packed again, never used.
    """

    def __init__(self, api: dict[str, Any], cache_dir: Path, num_threads: int):
        self.api, self.cache_dir, self.num_threads = api, cache_dir, num_threads
        # One LiteRT environment for all graphs. The plugin paths point at an empty folder
        # of ours, so no NPU compiler plugin is searched for and loaded. Not the cache dir
        # itself: LiteRT walks the plugin path recursively at every open, and a cache dir
        # that holds anything large (seen: a board userland under ~/.cache/gemma-edge) made
        # the first open take minutes.
        no_plugins = cache_dir / "litert-no-plugins"
        no_plugins.mkdir(exist_ok=True)
        self.environment = api["Environment"].create(options=api["EnvironmentOptions"](
            compiler_plugin_path=str(no_plugins), dispatch_library_path=str(no_plugins)))

    def cache_path(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256[:32]}-litert{self.api['version']}.xnnpack"

    def unverified_cache_path(self, graph_file: Path, claimed_sha256: str) -> Path:
        """The cache of a graph whose content was not verified: named by the manifest's hash
        and the file's stat, so a changed file packs a new cache."""
        stamp = ":".join(str(v) for v in stat_stamp(os.stat(graph_file)))
        tag = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        return self.cache_dir / (f"{claimed_sha256[:16]}-unverified-{tag}"
                                 f"-litert{self.api['version']}.xnnpack")

    @staticmethod
    def record_path(cache: Path) -> Path:
        return cache.with_name(cache.name + ".json")

    def intact(self, cache: Path) -> bool:
        """Does ``cache`` match the record written when it was packed (hashed when its stat
        changed)?"""
        record = read_record(self.record_path(cache))
        try:
            st = os.stat(cache)
        except OSError:
            return False
        if not record.get("sha256") or record.get("bytes") != st.st_size:
            return False
        if record.get("stamp") == stat_stamp(st):
            return True
        try:
            if sha256_file(cache) != record["sha256"]:
                return False
        except OSError:
            return False
        self._record(cache, record["sha256"])  # same bytes, new stat (copied, touched)
        return True

    def _record(self, cache: Path, digest: Optional[str] = None) -> None:
        st = os.stat(cache)
        digest = digest or sha256_file(cache)
        if stat_stamp(os.stat(cache)) != stat_stamp(st):
            return  # changed while hashed (another process repacked it): no record, no use
        atomic_write_json(self.record_path(cache), {"sha256": digest, "bytes": st.st_size,
                                                    "stamp": stat_stamp(st)})

    def _discard(self, cache: Path, why: str) -> None:
        log.warning("gemma-edge: weight cache %s %s; deleted, packing it again", cache.name, why)
        for path in (cache, self.record_path(cache)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def open(self, graph_file: Path, sha256: Optional[str], claimed_sha256: str = "") -> Any:
        """``graph_file`` as a CompiledModel; ``sha256`` its verified hash, or None when
        unknown (then ``claimed_sha256``, the manifest's, names an unverified cache)."""
        final = (self.cache_path(sha256) if sha256
                 else self.unverified_cache_path(graph_file, claimed_sha256))
        if final.exists() and not self.intact(final):
            self._discard(final, "does not match the record written when it was packed"
                          if self.record_path(final).exists() else "has no integrity record")
        if not sha256:  # unverified caches of older stats of this graph are stale
            for stale in self.cache_dir.glob(f"{claimed_sha256[:16]}-unverified-*.xnnpack"):
                if stale != final:
                    for path in (stale, self.record_path(stale)):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
        building = not final.exists()
        target = final.with_name(f"{final.name}.{os.getpid()}.tmp") if building else final
        api = self.api
        options = api["Options"](api["HardwareAccelerator"].CPU, cpu_options=api["CpuOptions"](
            num_threads=self.num_threads, xnnpack_weight_cache_path=str(target)))
        try:
            model = api["CompiledModel"].from_file(str(graph_file), environment=self.environment,
                                                   options=options)
        except (ValueError, RuntimeError) as exc:
            if building and target.exists():
                target.unlink()
            raise ArtifactError(f"{graph_file}: the LiteRT runtime cannot load it "
                                f"({first_line(exc)}); re-export or check the file") from exc
        # The open read the flatbuffer's tables; their pages are faulted back in if needed.
        release_file_pages(graph_file)
        if building:
            if target.exists():
                os.replace(target, final)  # the open mapping follows the inode
                try:
                    self._record(final)
                except OSError as exc:  # no record: the next open packs again, never trusts it
                    log.warning("gemma-edge: cannot record the integrity of %s (%s)",
                                final, exc.strerror)
                log.info("gemma-edge: packed %s's weights into %s", graph_file.name, final)
            else:
                log.warning("gemma-edge: XNNPACK wrote no weight cache for %s", graph_file.name)
        return model


class WeightCachedRunner:
    """One signature of a CompiledModel: ``run(embeddings, mask, pool) -> [S, D]`` float32.

    Same contract as ``runtime.GraphRunner`` for float-I/O graphs (the CPU float and
    int8 graphs); integer-I/O graphs stay on the Interpreter path.
    """

    def __init__(self, model: Any, signature: str, seq_len: int, hidden: int, slots: int):
        self.model, self.seq_len, self.hidden, self.slots = model, seq_len, hidden, slots
        signatures = list(model.get_signature_list())
        if signature not in signatures:
            raise ArtifactError(f"graph has no signature {signature!r} (has {signatures}); "
                                "the artifacts are inconsistent, re-export")
        self._index = signatures.index(signature)
        details = model.get_input_tensor_details(signature)
        names = list(details)
        order = match_inputs({n: details[n]["shape"] for n in names}, seq_len, hidden, slots)
        self._order = [names.index(n) for n in order]
        for name in names:
            if np.dtype(details[name]["dtype"]) != np.float32:
                raise ArtifactError(f"input {name!r} of {signature} is {details[name]['dtype']}; "
                                    "the compiled-model path takes float32 graphs only")
        outputs = model.get_output_tensor_details(signature)
        self._out_shape = tuple(next(iter(outputs.values()))["shape"])
        self._inputs = model.create_input_buffers(self._index)
        self._outputs = model.create_output_buffers(self._index)

    def run(self, embeddings: np.ndarray, mask: np.ndarray, pool: np.ndarray) -> np.ndarray:
        for position, array in zip(self._order, (embeddings, mask, pool)):
            self._inputs[position].write(np.ascontiguousarray(array, dtype=np.float32))
        self.model.run_by_index(self._index, self._inputs, self._outputs)
        out = self._outputs[0].read(int(np.prod(self._out_shape)), np.float32)
        return np.asarray(out, dtype=np.float32).reshape(self.slots, -1)
