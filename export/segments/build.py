"""The build of the segments: convert, calibrate and quantise every segment into files.

One fully int8 TFLite graph per layer and kind per bucket (``edgetpu/attn_<T>_<L>.tflite``,
``edgetpu/mlp_<T>_<L>.tflite``; a split attention's ``attn_qkv_<T>_<L>`` and
``attn_o_<T>_<L>``) and the host loop's constants (``edgetpu/host.npz``):
``SegmentBuild`` measures the scales, checks the rewrite in float, and has worker
processes fill and quantise the graphs while the export does other work.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..encoder import EncoderCore
from ..quantize import RangeFn
from .calibration import measure_scales, segment_inputs
from .graph import SegmentTemplate, build_template, fill_checked, template_key
from .host import check_float, graph_parts, layer_attention, layer_segments, part_feeds
from .modules import LayerScales
from .recipe import DEFAULT_RECIPE, SegmentRecipe
from .split_attention import host_attention_constants

SEGMENT_DIR = "edgetpu"
HOST_FILE = f"{SEGMENT_DIR}/host.npz"
# Channel scales for every bucket from a float pass over this many samples of each: the
# same scales (one host file) served the held-out set as well as scales measured per
# bucket on 12 of its own samples did (docs/quantization.md), at 3 minutes less export.
SCALE_SAMPLES = 4
APPROACH = "full-int8-segments"


def segment_name(kind: str, seq_len: int, layer: int) -> str:
    return f"{SEGMENT_DIR}/{kind}_{seq_len}_{layer:02d}.tflite"


def host_constants(core: EncoderCore, scales: Sequence[LayerScales]) -> dict[str, np.ndarray]:
    """Everything the device's host loop needs besides the segment graphs (float32)."""
    def f32(t: torch.Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(t.detach().numpy() if isinstance(t, torch.Tensor) else t, np.float32)

    out: dict[str, np.ndarray] = {
        "embed_scale": np.float32(core.spec.embed_scale),
        "eps": np.float32(core.spec.rms_eps),
        "final_gain": f32(core.final_norm.gain),
        "attn_in": np.stack([s.attn_in for s in scales]),
        "attn_out": np.stack([s.attn_out for s in scales]),
        "ff_in": np.stack([s.ff_in for s in scales]),
        "ff_out": np.stack([s.ff_out for s in scales]),
        # folded into the segments' weights; kept to rebuild the float segments
        # (`gemma-edge eval --sensitivity --sensitivity-precision full-int8`)
        "v_scale": np.stack([s.v for s in scales]),
        "act_scale": np.stack([s.act for s in scales]),
        "q_scale": np.stack([s.q for s in scales]),
        "k_scale": np.stack([s.k for s in scales]),
        # a format field (MLP channel groups, a study option that lost); always one group
        "act_groups": np.zeros((len(scales), len(scales[0].act)), np.int32),
        "act_split": np.array([s.act_split for s in scales], np.float32),
        "softmax_split": np.array([s.softmax_split for s in scales], np.float32),
        "softmax_split_from": np.array([s.softmax_split_from for s in scales], np.int32),
        "host_attention_upto": np.array([s.host_attention_upto for s in scales], np.int32),
        "post_attn_gain": np.stack([f32(layer.post_attn_norm.gain) for layer in core.layers]),
        "post_ff_gain": np.stack([f32(layer.post_ff_norm.gain) for layer in core.layers]),
        "dense_count": np.int32(len(core.dense)),
        "dense_mean": np.int32(core.dense_has_bias),
    }
    if any(s.host_attention_upto for s in scales):
        spec = core.spec
        attention = [layer_attention(spec, i) for i in range(len(core.layers))]
        out.update(host_attention_constants(
            list(core.layers), list(scales), [theta for _, theta in attention],
            [spec.window_radius if sliding else 0 for sliding, _ in attention]))
    for i, dense in enumerate(core.dense):
        out[f"dense_{i}_weight"] = f32(dense.weight)
        if dense.bias is not None:
            out[f"dense_{i}_bias"] = f32(dense.bias)
    return out


def scales_from_host(host: dict[str, np.ndarray]) -> list[LayerScales]:
    """The LayerScales an export used, read back from its host.npz."""
    return [LayerScales(host["attn_in"][i], host["v_scale"][i], host["attn_out"][i],
                        host["ff_in"][i], host["act_scale"][i], host["ff_out"][i],
                        host["q_scale"][i], host["k_scale"][i],
                        float(host["act_split"][i]) if "act_split" in host else 0.0,
                        float(host["softmax_split"][i]) if "softmax_split" in host else 0.0,
                        int(host["softmax_split_from"][i]) if "softmax_split_from" in host else 0,
                        host["v_abs"][i] if "v_abs" in host else None,
                        int(host["host_attention_upto"][i]) if "host_attention_upto" in host else 0)
            for i in range(len(host["attn_in"]))]


def quantize_segment(kind: str, segment: torch.nn.Module, seq_len: int,
                     hidden: int, feeds: Sequence[dict[str, np.ndarray]],
                     ranges: Optional[RangeFn] = None,
                     template: Optional[SegmentTemplate] = None) -> bytes:
    """Convert one segment ("attn", "mlp", "attn_qkv" or "attn_o") and quantise it fully to int8 on ``feeds``;
    with a ``template`` of its structure the float graph is the template filled with the
    segment's values (checked on the first feed) instead of a conversion.

    Takes only that segment (picklable: the export's worker processes receive it)."""
    graph = fill_checked(template, kind, segment, seq_len, hidden, feeds[0])
    return quantize_float_segment(graph, feeds, ranges)


def quantize_float_segment(float_model: bytes, feeds: Sequence[dict[str, np.ndarray]],
                           ranges: Optional[RangeFn] = None) -> bytes:
    """A converted segment (``float_segment``) quantised fully to int8 on ``feeds``
    (``ranges``: see ``quantize.quantize_graph``)."""
    from ..quantize import Approach, QuantConfig, quantize_graph

    return quantize_graph(float_model, "segment", QuantConfig(Approach.FULL_INT8), feeds, ranges)


class SegmentBuild:
    """The segments of every bucket, converted and quantised by worker processes while
    the caller does other work (the export converts its float and CPU int8 graphs
    meanwhile: on 2 cores that work leaves one core idle for minutes).

    Entering measures the per-channel scales, writes the host constants, checks the
    rewrite in float, has the pool convert one template per segment structure
    (``graph``), records every segment's calibration inputs (this process, float
    torch), and submits all segments to the pool; ``collect()`` waits for them,
    checks each is fully int8 and writes the files. Segment files appear in
    ``out_dir`` only during ``collect()``. Leaving with an error cancels what has not
    started.

    ``calibration``: {bucket: [graph inputs]} from the project corpus
    (``export.calibration``). Per-channel scales come from a float pass over the first
    ``SCALE_SAMPLES`` samples of every bucket; each segment is then calibrated on its own
    inputs as the host computes them in float (min/max, ai-edge-quantizer
    static_wi8_ai8), so calibration memory is one layer's tensors, whatever the bucket.
    """

    def __init__(self, core: EncoderCore, out_dir: Path, buckets: Sequence[int],
                 calibration: dict[int, list[dict[str, np.ndarray]]],
                 recipe: SegmentRecipe = DEFAULT_RECIPE,
                 progress: Optional[Callable[[str], None]] = None,
                 workers: Optional[int] = None,
                 on_segment_done: Optional[Callable[[], None]] = None,
                 templates: bool = True):
        self.core, self.out_dir, self.buckets = core, Path(out_dir), list(buckets)
        self.calibration, self.recipe, self.progress = calibration, recipe, progress
        self.workers = default_workers() if workers is None else workers
        self.templates = templates
        self.on_segment_done = on_segment_done
        self.float_check: dict[int, float] = {}
        self._jobs: dict[int, list[tuple[int, str, Future]]] = {}
        self._pool: contextlib.ExitStack = contextlib.ExitStack()

    def _say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    @torch.no_grad()
    def __enter__(self) -> SegmentBuild:
        from gemma_edge.atomic_files import atomic_write_npz

        (self.out_dir / SEGMENT_DIR).mkdir(parents=True, exist_ok=True)
        core, hidden = self.core, self.core.spec.hidden_size
        stats_samples = [s for t in self.buckets for s in self.calibration[t][:SCALE_SAMPLES]]
        self._say("segments: measuring per-channel scales")
        scales = measure_scales(core, stats_samples, self.recipe)
        atomic_write_npz(self.out_dir / HOST_FILE, host_constants(core, scales))
        pool = self._pool.enter_context(_segment_pool(self.workers))
        try:
            # per bucket: check the rewrite, have the workers convert one template per
            # graph structure (``graph``) while this process records the
            # calibration inputs; then every segment is filled in and quantised
            prepared = []
            for seq_len in self.buckets:
                segments = layer_segments(core, seq_len, scales)
                worst = check_float(core, scales, segments, self.calibration[seq_len][:2])
                self.float_check[seq_len] = worst
                self._say(f"segments: bucket {seq_len} equal in float (cos {worst:.7f})")
                templates: dict[tuple, Future] = {}
                for pair in segments if self.templates else []:
                    for kind, segment in graph_parts(pair):
                        key = template_key(segment)
                        if key not in templates:
                            templates[key] = pool.submit(build_template, kind, segment,
                                                         seq_len, hidden)
                inputs = segment_inputs(core, scales, self.calibration[seq_len])
                prepared.append((seq_len, segments, templates, inputs))
            for seq_len, segments, templates, inputs in prepared:
                jobs = []
                for i, pair in enumerate(segments):
                    for kind, segment in graph_parts(pair):
                        future = templates.get(template_key(segment)) if templates else None
                        feeds = (inputs[(i, kind)] if kind in ("attn", "mlp")
                                 else part_feeds(pair, kind, inputs[(i, "attn")]))
                        job = pool.submit(quantize_segment, kind, segment, seq_len, hidden,
                                          feeds, None, future.result() if future else None)
                        if self.on_segment_done:
                            job.add_done_callback(lambda _job: self.on_segment_done())
                        jobs.append((i, kind, job))
                self._jobs[seq_len] = jobs
            del prepared
        except BaseException:
            self._pool.__exit__(*sys.exc_info())
            raise
        return self

    def collect(self) -> list[dict]:
        """Wait for every segment, check it, write it; the manifest entries per bucket."""
        from gemma_edge.atomic_files import atomic_write_bytes

        from ..quantize import check_fully_int8

        entries = []
        for seq_len in self.buckets:
            files = []
            census: dict[str, int] = {}
            for i, kind, job in self._jobs[seq_len]:
                quantized = job.result()
                for key, n in check_fully_int8(quantized).items():
                    census[key] = census.get(key, 0) + n
                name = segment_name(kind, seq_len, i)
                atomic_write_bytes(self.out_dir / name, quantized)
                files.append(name)
                self._say(f"segments: bucket {seq_len}, layer {i} {kind} written")
            entries.append({"path": HOST_FILE, "role": "edgetpu", "layout": "segments",
                            "seq_lens": [int(seq_len)],
                            "pool_slots": int(self.calibration[seq_len][0]["pool"].shape[1]),
                            "segments": files, "approach": APPROACH,
                            "smoothing": self.recipe.to_json(), "census": census,
                            "calibration_per_bucket": len(self.calibration[seq_len]),
                            "float_min_cosine": self.float_check[seq_len]})
            self._jobs[seq_len] = []  # the written graphs' bytes (~150 MB per bucket)
        return entries

    def __exit__(self, *exc: Any) -> None:
        self._pool.__exit__(*exc)


def build_segmented(core: EncoderCore, out_dir: Path, buckets: Sequence[int],
                    calibration: dict[int, list[dict[str, np.ndarray]]],
                    recipe: SegmentRecipe = DEFAULT_RECIPE,
                    progress: Optional[Callable[[str], None]] = None,
                    workers: Optional[int] = None, templates: bool = True) -> list[dict]:
    """Write every bucket's segments + the host constants; returns manifest entries
    (``SegmentBuild`` without other work in between). ``workers`` processes convert
    and quantise the segments (default ``default_workers()``); ``templates=False``
    converts every segment with litert-torch instead of filling templates."""
    with SegmentBuild(core, out_dir, buckets, calibration, recipe, progress,
                      workers, templates=templates) as build:
        return build.collect()


def default_workers() -> int:
    """Processes that convert and quantise segments: one per core, at most two.

    litert-torch's conversion is mostly single-threaded Python: on the 2-core
    reference machine two processes built the real model's segments in 12 minutes
    instead of 18 (docs/quantization.md). Each holds one segment's tensors (< 1 GB).
    """
    return max(1, min(2, os.cpu_count() or 1))


class _Inline:
    """The ``submit`` of an executor, run at once in this process (one worker)."""

    def submit(self, fn: Callable[..., bytes], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def _quiet_worker() -> None:
    """One torch thread per worker; the libraries' deprecation warnings, printed by every
    worker, would cover the export's progress bars (errors still print)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)


@contextlib.contextmanager
def _segment_pool(workers: int) -> Iterator[Any]:
    if workers <= 1:
        yield _Inline()
        return
    # spawn, not fork: the parent holds torch's thread pools and a loaded checkpoint
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_quiet_worker)
    try:
        yield pool
    except BaseException:
        # an error (or Ctrl-C) elsewhere: drop the queued segments, wait for the running
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
