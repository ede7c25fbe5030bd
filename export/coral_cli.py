"""``gemma-edge coral-graph``: the single-graph Coral-shaped fully int8 encoder, one bucket.

Not what the export ships (that is per-layer segments, export/segments.py: as one
int8 graph the encoder does not keep its quality, docs/quantization.md); it exists
so that the comparison census in docs/edgetpu.md can be re-run:
``gemma-edge coral-graph --checkpoint DIR --seq-len 256 --out build/coral_256.tflite
--placeholder-ranges`` then ``gemma-edge check build/coral_256.tflite``.
Imports nothing heavy at module level (the CLI parser is built on boards too).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .coral_encoder import build_coral_graph
    from .encoder import build_encoder

    core, _ = build_encoder(load_checkpoint(args.checkpoint))
    calibration = None
    if args.calibration_artifacts and not args.placeholder_ranges:
        from .calibration import calibration_set

        calibration = calibration_set(args.calibration_artifacts, [args.seq_len],
                                      args.calibration_samples)[args.seq_len]
        calibration = [{**s, "pool": s["pool"][:, :args.pool_slots]} for s in calibration]
    path = build_coral_graph(core, args.seq_len, args.out, calibration=calibration,
                             pool_slots=args.pool_slots,
                             placeholder_ranges=args.placeholder_ranges)
    print(f"wrote {path}; map it with: gemma-edge check {path}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("coral-graph",
                       help="single-graph Coral-shaped int8 encoder for one bucket "
                            "(comparison census; the export ships per-layer segments)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pool-slots", type=int, default=1)
    p.add_argument("--calibration-artifacts", type=Path, default=None,
                   help="an export whose tokenizer/table turn the corpus into calibration "
                        "inputs (default: synthetic inputs)")
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--placeholder-ranges", action="store_true",
                   help="skip calibration (structure only: for `gemma-edge check` where "
                        "calibration does not fit in memory; not for inference)")
    p.set_defaults(func=run)
