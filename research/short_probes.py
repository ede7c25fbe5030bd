"""Research: the probes behind the issue 20 diagnosis (short texts in full-int8).

Each probe runs the export's 64-token int8 segments through ``short_tail.HybridHost`` on
a few held-out short sentences (diagnosis only, never for choosing a recipe):

- ``position``: one text's cosine to float at every offset in the bucket (packed after an
  English sentence of each length): how much the result depends on where the text sits;
- ``table``: the int8 token table (what ``precision="full-int8"`` feeds) against the fp16
  one, with int8 and with float segments;
- ``float-one``: the cosine when one named segment runs in float and the rest in int8;
- ``coverage``: which corpus texts the export's 64-token calibration packs (languages,
  lengths, prompts).

From a checkout::

    python -m research.short_probes position --checkpoint DIR --artifacts ART --ids s-he-018
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .short_tail import KINDS, HybridHost, cosine, text_rows, token_ids

SEQ_LEN = 64


def _setup(args: Any) -> tuple[Any, Any, HybridHost, list[tuple[str, list[int]]]]:
    import torch

    from gemma_edge.device import Embedder
    from gemma_edge.errors import InputError
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    rows = {r["id"]: r for r in text_rows([], "heldout-short")}
    missing = [i for i in args.ids if i not in rows]
    if missing:
        raise InputError(f"--ids: {', '.join(missing)} not in heldout/short.jsonl")
    torch.set_num_threads(1)
    host = Embedder(args.artifacts, backend="cpu", precision="float")
    device = Embedder(args.artifacts, backend="cpu", precision="full-int8")
    core, _ = build_encoder(load_checkpoint(args.checkpoint))
    hybrid = HybridHost.from_export(core, args.artifacts, SEQ_LEN)
    return host, device, hybrid, list(zip(args.ids, token_ids(host, [rows[i] for i in args.ids])))


def position(args: Any) -> None:
    from gemma_edge.export.calibration import text_inputs

    host, device, hybrid, texts = _setup(args)
    every = [(i, k) for i in range(len(hybrid.core.layers)) for k in KINDS]
    fillers: dict[int, list[int]] = {}
    for t in token_ids(host, text_rows(["en"], "heldout-short")):
        fillers.setdefault(len(t), t)
    for name, t in texts:
        ref = hybrid.reference(text_inputs(host, [t], SEQ_LEN))[0]
        got = {0: cosine(ref, hybrid.run(text_inputs(device, [t], SEQ_LEN), every)[0])}
        for n, f in sorted(fillers.items()):
            if n + len(t) <= SEQ_LEN:
                got[n] = cosine(ref, hybrid.run(text_inputs(device, [f, t], SEQ_LEN), every)[1])
        v = np.array(list(got.values()))
        print(f"{name} ({len(t)} tokens) at {len(v)} offsets {min(got)}-{max(got)}: mean "
              f"{v.mean():.4f} std {v.std():.4f} min {v.min():.4f} max {v.max():.4f}")


def table(args: Any) -> None:
    from gemma_edge.export.calibration import text_inputs

    host, device, hybrid, texts = _setup(args)
    every = [(i, k) for i in range(len(hybrid.core.layers)) for k in KINDS]
    for name, t in texts:
        fp16, int8 = text_inputs(host, [t], SEQ_LEN), text_inputs(device, [t], SEQ_LEN)
        ref = hybrid.reference(fp16)[0]
        print(f"{name} ({len(t)} tokens): int8 segments with the fp16 table "
              f"{cosine(ref, hybrid.run(fp16, every)[0]):.4f}, with the int8 table "
              f"{cosine(ref, hybrid.run(int8, every)[0]):.4f}; float segments with the int8 "
              f"table {cosine(ref, hybrid.reference(int8)[0]):.5f}; the device "
              f"{cosine(ref, device.embed_ids([t])[0]):.4f}")


def float_one(args: Any) -> None:
    from gemma_edge.export.calibration import text_inputs

    host, device, hybrid, texts = _setup(args)
    every = [(i, k) for i in range(len(hybrid.core.layers)) for k in KINDS]
    for name, t in texts:
        sample = text_inputs(device, [t], SEQ_LEN)
        ref = hybrid.reference(text_inputs(host, [t], SEQ_LEN))[0]
        parts = [f"all int8 {cosine(ref, hybrid.run(sample, every)[0]):.4f}"]
        for seg in args.segments:
            layer, kind = seg.split("/")
            keep = [s for s in every if s != (int(layer), kind)]
            parts.append(f"{seg} float {cosine(ref, hybrid.run(sample, keep)[0]):.4f}")
        print(f"{name} ({len(t)} tokens): " + ", ".join(parts))


def coverage(args: Any) -> None:
    """The export's 64-token calibration draw (calibration.bucket_samples, seed 0)."""
    from gemma_edge.datasets import load_calibration_corpus
    from gemma_edge.device import Embedder
    from gemma_edge.device.packing import pack_greedy
    from gemma_edge.export.calibration import bucket_texts, corpus_token_ids

    host = Embedder(args.artifacts, backend="cpu", precision="float")
    rows = load_calibration_corpus()
    ids = corpus_token_ids(host, rows)
    row_of = {id(t): r for t, r in zip(ids, rows)}
    rng = random.Random(SEQ_LEN)  # bucket_samples: seed + seq_len
    singles, _ = bucket_texts(ids, SEQ_LEN, host.buckets)
    short = [t for t in ids if len(t) <= SEQ_LEN // 2]
    count = args.calibration
    chosen = rng.sample(singles, min(count - count // 2, len(singles)))
    packed: list[Sequence[int]] = []
    for _ in range(count - len(chosen)):
        group = rng.sample(short, min(len(short), host.slots * 2))
        packed += [group[i] for i in pack_greedy([len(g) for g in group], SEQ_LEN, host.slots)[0]]

    def langs(texts: Sequence[Sequence[int]]) -> str:
        return str(dict(collections.Counter(row_of[id(t)]["lang"] for t in texts).most_common()))

    print(f"corpus: {len(ids)} texts, {len(short)} of <= {SEQ_LEN // 2} tokens "
          f"(prompts {dict(collections.Counter(row_of[id(t)]['prompt'] for t in short))})")
    print(f"single texts ({len(chosen)}, {min(map(len, chosen))}-{max(map(len, chosen))} "
          f"tokens): {langs(chosen)}")
    print(f"packed texts ({len(packed)}, {min(map(len, packed))}-{max(map(len, packed))} "
          f"tokens): {langs(packed)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from gemma_edge.errors import GemmaEdgeError

    p = argparse.ArgumentParser(prog="python -m research.short_probes", description=__doc__)
    p.add_argument("probe", choices=("position", "table", "float-one", "coverage"))
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--ids", type=lambda s: [x for x in s.split(",") if x], default=[])
    p.add_argument("--segments", type=lambda s: [x for x in s.split(",") if x],
                   default=["6/attn", "23/attn"], help="float-one: e.g. 6/attn,20/mlp")
    p.add_argument("--calibration", type=int, default=32, help="coverage: samples per bucket")
    args = p.parse_args(argv)
    if args.probe != "coverage" and (not args.checkpoint or not args.ids):
        p.error(f"{args.probe} needs --checkpoint and --ids")
    try:
        {"position": position, "table": table, "float-one": float_one,
         "coverage": coverage}[args.probe](args)
    except GemmaEdgeError as exc:
        print(f"python -m research.short_probes: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
