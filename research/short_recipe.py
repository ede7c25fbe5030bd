"""Research: the 64-token segments' calibration for short texts (issue 20, ``short-recipe``).

The export calibrates each segment bucket on 32 corpus samples: half single texts
longer than the next smaller float bucket (33-64 tokens at 64), half packed groups of
short texts. A packed group is the first bin of ``pack_greedy`` over a random draw of
``2 * slots`` short texts, and first-fit *decreasing* puts the longest texts in the first
bin: at 64 tokens every calibration group is two texts of 24-31 tokens, so the
segments never calibrate on the 13-23-token texts the tail is made of (issue 20).

This builds one bucket's segments twice from the corpus texts not held back
(``segment_study.split_corpus``) with the same per-channel scales: with the export's
sampling and with a variant, and compares both with float on the held-back corpus
texts of up to half the bucket, each alone and packed in order (the device packs short
texts). No held-out text is read: this is for choosing. From a checkout::

    python -m research short-recipe --checkpoint DIR --artifacts ART --variant packed-all

Measured (2026-12-07, real model, 64 tokens, 52 held-back short corpus texts alone / the
same packed in 51 slots; mean / min cosine): with their own prompts export 0.9928 /
0.9848 (packed 0.9929 / 0.9819), packed-all 0.9932 / 0.9832 (0.9928 / 0.9824), the
export's sampling with --ranges max 0.9789 / 0.9371 (0.9793 / 0.9371); with
the document prompt export 0.9929 / 0.9853 (0.9932 / 0.9848), packed-all-doc 0.9926 /
0.9825 (0.9922 / 0.9825). No variant is a fix, and the held-back texts do not show the
tail (none below 0.98): see the issue 20 diagnosis.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .short_tail import KINDS

VARIANTS = ("export", "packed-all", "packed-all-doc")


def packed_in_order(ids: Sequence[Sequence[int]], seq_len: int, slots: int
                    ) -> list[list[Sequence[int]]]:
    """Consecutive texts packed into buckets in the order given (a new bucket when the
    next text does not fit or the slots are used): groups of every length mix."""
    groups: list[list[Sequence[int]]] = []
    room = 0
    for t in ids:
        if len(t) > seq_len:
            raise ValueError(f"a text of {len(t)} tokens does not fit {seq_len}")
        if not groups or len(t) > room or len(groups[-1]) >= slots:
            groups.append([])
            room = seq_len
        groups[-1].append(t)
        room -= len(t)
    return groups


def calibration_variant(host: Any, rows: Sequence[dict[str, Any]], seq_len: int, count: int,
                        variant: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` calibration samples for one bucket from corpus ``rows``.

    "export": ``calibration.bucket_samples`` (what the export does). "packed-all": the
    same single texts (the same first samples, so the same per-channel scales), the
    packed half made of random short texts of every length packed in order instead of
    the first first-fit-decreasing bin. "packed-all-doc": as packed-all with each short
    text also under the document prompt (the corpus's short texts are queries; the
    device embeds short documents too)."""
    from gemma_edge.device.embedder import document_text
    from gemma_edge.export.calibration import bucket_samples, corpus_token_ids, text_inputs

    ids = corpus_token_ids(host, rows)
    samples = bucket_samples(host, ids, seq_len, count, seed=seed)
    if variant == "export":
        return samples
    singles = count - count // 2
    short = [t for t in ids if len(t) <= seq_len // 2]
    if variant == "packed-all-doc":
        texts = [document_text(r["text"], r.get("title")) for r, t in zip(rows, ids)
                 if len(t) <= seq_len // 2]
        doc_ids, _ = host.tokenizer.encode(texts, seq_len)
        short = short + [t for t in doc_ids if len(t) <= seq_len // 2]
    rng = random.Random(seed + seq_len + 1)
    rng.shuffle(short)
    groups = packed_in_order(short, seq_len, host.slots)
    return samples[:singles] + [text_inputs(host, g, seq_len) for g in groups[:count - singles]]


def dev_samples(host: Any, rows: Sequence[dict[str, Any]], seq_len: int, seed: int = 1,
                prompt: str = "corpus") -> list[tuple[dict[str, np.ndarray], int]]:
    """(sample, texts in it): every held-back short text alone, then the same texts
    shuffled and packed in order (each at another position). ``prompt``: "corpus" (each
    row's own prompt) or "document" (every text with the document prompt, as the
    issue's tail was measured)."""
    from gemma_edge.export.calibration import corpus_token_ids, text_inputs

    if prompt == "document":
        rows = [dict(r, prompt="document", title=None) for r in rows]
    short = [t for t in corpus_token_ids(host, rows) if len(t) <= seq_len // 2]
    out = [(text_inputs(host, [t], seq_len), 1) for t in short]
    order = list(short)
    random.Random(seed).shuffle(order)
    out += [(text_inputs(host, g, seq_len), len(g)) for g in packed_in_order(order, seq_len, host.slots)]
    return out


def build(core: Any, calibration: list[dict[str, np.ndarray]], seq_len: int, out: Path,
          ranges: str = "moving-average") -> tuple[Path, list[Path]]:
    """One bucket's segments as the export builds them (scales from the first
    ``SCALE_SAMPLES`` samples, one template per graph structure, each segment calibrated
    on its own float inputs), with the activation range statistic ``ranges``
    (``research.ranges``): (host.npz, segment files in layer order)."""
    from gemma_edge.atomic_files import atomic_write_bytes, atomic_write_npz
    from gemma_edge.export.segments import (
        build_template,
        host_constants,
        layer_segments,
        measure_scales,
        quantize_segment,
        segment_inputs,
        template_key,
    )
    from gemma_edge.export.segments.build import SCALE_SAMPLES

    from .ranges import RangeStatistic, range_function

    scales = measure_scales(core, calibration[:SCALE_SAMPLES])
    host_file = out / "host.npz"
    atomic_write_npz(host_file, host_constants(core, scales))
    segments = layer_segments(core, seq_len, scales)
    inputs = segment_inputs(core, scales, calibration)
    hidden = core.spec.hidden_size
    templates: dict[tuple, Any] = {}
    files = []
    for i, pair in enumerate(segments):
        for kind, segment in zip(KINDS, pair):
            key = template_key(segment)
            if key not in templates:
                templates[key] = build_template(kind, segment, seq_len, hidden)
            data = quantize_segment(kind, segment, seq_len, hidden, inputs[(i, kind)],
                                    range_function(RangeStatistic(ranges)), templates[key])
            files.append(out / f"{kind}_{seq_len}_{i:02d}.tflite")
            atomic_write_bytes(files[-1], data)
    return host_file, files


def evaluate(hybrid: Any, samples: Sequence[tuple[dict[str, np.ndarray], int]]
             ) -> dict[str, Any]:
    """Cosine to float of every text slot, alone and packed, all segments int8."""
    from .short_tail import cosine

    every = [(i, k) for i in range(len(hybrid.core.layers)) for k in KINDS]
    alone, packed = [], []
    for sample, n in samples:
        ref, got = hybrid.reference(sample), hybrid.run(sample, every)
        (alone if n == 1 else packed).extend(cosine(ref[s], got[s]) for s in range(n))

    def stats(v: list[float]) -> dict[str, float]:
        a = np.array(v)
        return {"n": len(a), "mean": float(a.mean()), "min": float(a.min()),
                "p1": float(np.percentile(a, 1)), "below_0.98": int((a < 0.98).sum())}

    return {"alone": stats(alone), "packed": stats(packed), "alone_values": alone}


def _run(args: Any) -> int:
    import json

    import torch

    from gemma_edge.device import Embedder
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    from .segment_study import split_corpus
    from .short_tail import HybridHost

    variants = [v for v in args.variant.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        from gemma_edge.errors import InputError
        raise InputError(f"--variant {args.variant}: a comma list of {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    cal_rows, dev_rows = split_corpus()
    host = Embedder(args.artifacts, backend="cpu", precision="float")
    dev = dev_samples(host, dev_rows, args.seq_len, prompt=args.dev_prompt)
    if args.dev_limit:
        dev = dev[:args.dev_limit] + [d for d in dev if d[1] > 1][:args.dev_limit // 2]
    core, _ = build_encoder(load_checkpoint(args.checkpoint))
    results = {}
    with torch.no_grad():
        for variant in variants:
            cal = calibration_variant(host, cal_rows, args.seq_len, args.calibration, variant)
            with tempfile.TemporaryDirectory() as tmp:
                host_file, files = build(core, cal, args.seq_len, Path(tmp), args.ranges)
                hybrid = HybridHost(core, host_file, files, args.seq_len)
                results[variant] = evaluate(hybrid, dev)
            shown = {k: v for k, v in results[variant].items() if k != "alone_values"}
            print(variant, args.ranges, json.dumps(shown), flush=True)
    if args.json:
        from gemma_edge.atomic_files import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("short-recipe", help="the 64-token segments' calibration for short "
                                            "texts, judged on held-back corpus texts (issue 20)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--artifacts", required=True, type=Path, help="a float export (tokenizer, table)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--calibration", type=int, default=32, help="samples per bucket")
    p.add_argument("--variant", default="export,packed-all",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--dev-limit", type=int, default=0,
                   help="at most this many held-back texts alone (and half as many packed "
                        "groups); 0: all")
    p.add_argument("--ranges", default="moving-average",
                   choices=("moving-average", "max", "median", "mse"),
                   help="activation range statistic (research/ranges.py; the export's: "
                        "moving-average)")
    p.add_argument("--dev-prompt", choices=("corpus", "document"), default="corpus",
                   help="the held-back texts with their own prompts or all with the "
                        "document prompt")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=_run)
