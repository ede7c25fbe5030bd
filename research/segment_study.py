"""Research: the measurements behind the segments' recipe (``segment-study``).

Builds one bucket's int8 segments with a chosen recipe and calibration size,
quantises only the segment kinds asked for (the others stay float PyTorch), and
prints the cosine of the result to the float encoder on held-out texts (or on
corpus texts held back from the calibration, for choosing). This is how the table
in docs/quantization.md was measured; the export itself uses the recipe's defaults
(``gemma_edge.export.segments.SegmentBuild``). From a checkout::

    python -m research segment-study --checkpoint DIR --artifacts ART --seq-len 128
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.device.embedder import document_text

from .ranges import RangeStatistic, range_function  # numpy only at import time

# torch, litert-torch and ai-edge-quantizer are imported inside the functions: the
# parser is built without them.


def heldout_inputs(art_dir: Path, seq_len: int, count: int) -> list[dict[str, np.ndarray]]:
    """Half queries, half documents of the held-out set, one text per bucket."""
    from gemma_edge.datasets import load_heldout
    from gemma_edge.device import Embedder
    from gemma_edge.export.calibration import text_inputs

    emb = Embedder(art_dir, backend="cpu", precision="float")
    queries, docs = load_heldout()
    texts = ([emb.prompts["query"] + q["text"] for q in queries[:count // 2]]
             + [document_text(d["text"]) for d in docs[:count - count // 2]])
    ids, _ = emb.tokenizer.encode(texts, seq_len)  # cut to the bucket, EOS kept
    return [text_inputs(emb, [i], seq_len) for i in ids]


DEV_EVERY = 10  # every 10th corpus text is held back from calibration by --eval-texts corpus


def split_corpus() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(calibration rows, development rows) of the corpus: every ``DEV_EVERY``-th text is
    held back, so a recipe can be judged on text it was not calibrated on without
    touching the held-out set (which only measures, never chooses)."""
    from gemma_edge.datasets import load_calibration_corpus

    rows = load_calibration_corpus()
    return ([r for i, r in enumerate(rows) if i % DEV_EVERY],
            [r for i, r in enumerate(rows) if i % DEV_EVERY == 0])


def corpus_dev_inputs(emb: Any, seq_len: int, count: int,
                      rows: Sequence[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Development texts (``split_corpus``) this bucket serves, one per bucket, as the
    calibration picks its single texts (``calibration.bucket_texts``; the longer texts,
    cut, after them), spread over the languages in corpus order. ``emb``: a float
    Embedder of the export."""
    from gemma_edge.export.calibration import bucket_texts, corpus_token_ids, text_inputs

    served, longer = bucket_texts(corpus_token_ids(emb, rows), seq_len, emb.buckets)
    fits = served + longer
    step = max(1, len(fits) // count)
    return [text_inputs(emb, [i], seq_len) for i in fits[::step][:count]]


def full_bucket_inputs(art_dir: Path, seq_len: int, count: int) -> list[dict[str, np.ndarray]]:
    """Held-out documents of at least ``seq_len`` tokens, cut to it: every row a real token.

    For per-tensor comparisons: padding rows are masked out of the result, but their
    intermediate values (rows with nothing visible) would dominate a tensor's error."""
    from gemma_edge.datasets import load_heldout
    from gemma_edge.device import Embedder
    from gemma_edge.errors import InputError
    from gemma_edge.export.calibration import cut_to_bucket, text_inputs

    emb = Embedder(art_dir, backend="cpu", precision="float")
    _, docs = load_heldout()
    ids, _ = emb.tokenizer.encode([document_text(d["text"]) for d in docs], 10**6)
    full = [cut_to_bucket(i, seq_len) for i in ids if len(i) >= seq_len][:count]
    if not full:
        raise InputError(f"no held-out document has {seq_len} tokens: use a smaller --seq-len")
    return [text_inputs(emb, [i], seq_len) for i in full]


def study(checkpoint: str, art_dir: Path, seq_len: int, recipe: Any,
          calibration: int, texts: int, kinds: Sequence[str],
          ladder: Optional[Sequence[int]] = None,
          ranges: RangeStatistic = RangeStatistic.MOVING_AVERAGE,
          eval_texts: str = "heldout") -> dict[str, Any]:
    """Cosine to the float encoder with the ``kinds`` segments in int8 (see module doc).

    ``ladder``: the buckets the segments exist for (calibration picks the single texts
    this bucket serves; default: the export's buckets). ``eval_texts``: "heldout" (the
    held-out set's queries and documents) or "corpus" (every 10th corpus text, held back
    from the calibration: for choosing a recipe)."""
    import torch

    with torch.no_grad():
        return _study(checkpoint, art_dir, seq_len, recipe, calibration, texts, kinds, ladder,
                      ranges, eval_texts)


def _study(checkpoint: str, art_dir: Path, seq_len: int, recipe: Any,
           calibration: int, texts: int, kinds: Sequence[str],
           ladder: Optional[Sequence[int]], ranges: RangeStatistic,
           eval_texts: str) -> dict[str, Any]:
    import torch
    from ai_edge_litert.interpreter import Interpreter
    from tqdm import tqdm

    from gemma_edge.device import Embedder
    from gemma_edge.device.segment_host import SegmentGraph
    from gemma_edge.export import segments as seg
    from gemma_edge.export.calibration import calibration_from, calibration_set
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import BucketEncoder, build_encoder
    from gemma_edge.export.segments import quantize_segment

    core, _ = build_encoder(load_checkpoint(checkpoint))
    if eval_texts == "corpus":
        cal_rows, dev_rows = split_corpus()
        host = Embedder(art_dir, backend="cpu", precision="float")
        cal = calibration_from(host, [seq_len], calibration, cal_rows, ladder)[seq_len]
        evals = corpus_dev_inputs(host, seq_len, texts, dev_rows)
    else:
        cal = calibration_set(art_dir, [seq_len], calibration, ladder=ladder)[seq_len]
        evals = heldout_inputs(art_dir, seq_len, texts)
    scales = seg.measure_scales(core, cal, recipe)
    segments = seg.layer_segments(core, seq_len, scales)
    float_run = seg.torch_runner(segments)
    inputs = seg.segment_inputs(core, scales, cal)
    hidden = core.spec.hidden_size
    int8: dict[tuple[int, str], Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (i, kind), feeds in tqdm(sorted(inputs.items()), desc="segments", unit="graph"):
            if kind not in kinds:
                continue
            module = segments[i][KINDS.index(kind)]
            parts = ([(kind, module, feeds)] if not isinstance(module, seg.SplitAttentionSegment)
                     else [(part, sub, seg.part_feeds(segments[i], part, feeds))
                           for part, sub in module.parts()])
            graphs = []
            for part, sub, part_feeds in parts:
                path = Path(tmp) / f"{part}_{i}.tflite"
                path.write_bytes(quantize_segment(part, sub, seq_len, hidden, part_feeds,
                                                  range_function(ranges)))
                graphs.append(SegmentGraph(Interpreter(model_path=str(path), num_threads=2),
                                           str(path)))
            int8[(i, kind)] = graphs[0] if len(graphs) == 1 else _split_runner(module, *graphs)

        def run(i: int, kind: str, x: Any, mask: Optional[Any]) -> Any:
            if (i, kind) not in int8:
                return float_run(i, kind, x, mask)
            return torch.from_numpy(int8[(i, kind)](x.numpy(), None if mask is None
                                                    else mask.numpy()))

        reference = BucketEncoder(core, seq_len).eval()
        cos = []
        for sample in evals:
            a = reference(*seg.sample_tensors(sample))[0, 0]
            b = seg.host_forward(core, scales, run, *seg.sample_tensors(sample))[0, 0]
            cos.append(float(torch.nn.functional.cosine_similarity(a, b, 0)))
    values = np.array(cos)
    return {"seq_len": seq_len, "recipe": recipe.to_json(), "calibration": calibration,
            "ranges": ranges.value, "eval_texts": eval_texts,
            "texts": len(values), "kinds": list(kinds), "cosine_mean": float(values.mean()),
            "cosine_min": float(values.min()), "cosine_p1": float(np.percentile(values, 1))}


def _split_runner(module: Any, qkv: Any, out: Any) -> Any:
    """A split attention with its two projections int8 graphs and the host core in float,
    called like a one-graph attention ``SegmentGraph``."""
    import torch

    def run(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
        def graph(fn: Any) -> Any:
            return lambda t: torch.from_numpy(fn(t.numpy()))
        with torch.no_grad():
            return module.run_with(graph(qkv), graph(out), torch.from_numpy(a),
                                   torch.from_numpy(mask)).numpy()
    return run


def tensor_study(checkpoint: str, art_dir: Path, seq_len: int, recipe: Any,
                 calibration: int, texts: int, kinds: Sequence[str], layers: Sequence[int],
                 ranges: RangeStatistic = RangeStatistic.MOVING_AVERAGE,
                 ladder: Optional[Sequence[int]] = None) -> dict[str, list[Any]]:
    """Per-tensor SNR (export/tensor_snr.py) of the ``layers``' int8 segments of ``kinds``.

    Each segment is calibrated as the export does it (corpus, host loop in float) and
    compared with its float graph on the inputs to that segment of held-out documents
    that fill the bucket (made by the float host loop, so errors of earlier layers do not
    enter; no padding rows, whose values nothing reads)."""
    import torch

    from gemma_edge.export import segments as seg
    from gemma_edge.export.calibration import calibration_set
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder
    from gemma_edge.export.segments import float_segment, quantize_float_segment

    from .tensor_snr import tensor_snr

    with torch.no_grad():
        core, _ = build_encoder(load_checkpoint(checkpoint))
        if any(not 0 <= i < len(core.layers) for i in layers):
            from gemma_edge.errors import InputError
            raise InputError(f"--tensor-snr {','.join(map(str, layers))}: the model has layers "
                             f"0-{len(core.layers) - 1}")
        cal = calibration_set(art_dir, [seq_len], calibration, ladder=ladder)[seq_len]
        scales = seg.measure_scales(core, cal, recipe)
        segments = seg.layer_segments(core, seq_len, scales)
        cal_inputs = seg.segment_inputs(core, scales, cal)
        eval_inputs = seg.segment_inputs(core, scales,
                                         full_bucket_inputs(art_dir, seq_len, texts))
        out: dict[str, list[Any]] = {}
        for i in layers:
            for kind in kinds:
                module = segments[i][KINDS.index(kind)]
                if isinstance(module, seg.SplitAttentionSegment):
                    from gemma_edge.errors import InputError
                    raise InputError(f"--seq-len {seq_len}: the attention is split there (its "
                                     "core runs on the host in float); --tensor-snr reads "
                                     "one-graph segments: --kinds mlp or --host-attention-upto 0")
                graph = float_segment(kind, module, seq_len, core.spec.hidden_size)
                int8 = quantize_float_segment(graph, cal_inputs[(i, kind)],
                                              range_function(ranges))
                out[f"layer {i:02d} / {kind}"] = tensor_snr(graph, int8, eval_inputs[(i, kind)])
    return out


KINDS = ("attn", "mlp")


def _alphas(text: str) -> list[float]:
    """argparse type for --smoothing: four migration strengths in [0, 1]."""
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        alphas = []
    if len(alphas) != 4 or not all(0.0 <= a <= 1.0 for a in alphas):
        raise argparse.ArgumentTypeError(f"{text!r}: four values in [0, 1] (attention input, "
                                         "V, MLP input, GELU product)")
    return alphas


def _kinds(text: str) -> list[str]:
    """argparse type for --kinds: a comma list of attn, mlp."""
    kinds = [k for k in text.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(KINDS)}")
    return kinds


def _run(args: Any) -> int:
    import json

    from gemma_edge.export.segments import DEFAULT_RECIPE, SegmentRecipe

    if args.texts < 1:
        from gemma_edge.errors import InputError
        raise InputError(f"--texts {args.texts}: at least 1 text to compare")
    default = DEFAULT_RECIPE
    alphas = args.smoothing or [default.attn_in, default.v, default.ff_in, default.act]
    recipe = SegmentRecipe(
        *alphas,
        mlp_host_sum=default.mlp_host_sum if args.mlp_host_sum is None else args.mlp_host_sum,
        mlp_split=default.mlp_split if args.mlp_split is None else args.mlp_split,
        softmax_split=default.softmax_split if args.softmax_split is None else args.softmax_split,
        softmax_split_from=(default.softmax_split_from if args.softmax_split_from is None
                            else args.softmax_split_from),
        host_attention_upto=(default.host_attention_upto if args.host_attention_upto is None
                             else args.host_attention_upto)).validate("--")
    if args.tensor_snr:
        from .tensor_snr import format_table

        tables = tensor_study(args.checkpoint, args.artifacts, args.seq_len, recipe,
                              args.calibration, args.texts, args.kinds, args.tensor_snr,
                              RangeStatistic(args.ranges), args.ladder)
        for title, rows in tables.items():
            print(format_table(f"{title} ({args.seq_len} tokens, up to {args.texts} held-out "
                               "documents): SNR of each int8 tensor vs the float graph", rows))
            print()
        return 0
    result = study(args.checkpoint, args.artifacts, args.seq_len,
                   recipe, args.calibration, args.texts, args.kinds, args.ladder,
                   RangeStatistic(args.ranges), args.eval_texts)
    print(json.dumps(result, indent=2))
    return 0


def register(sub: Any) -> None:
    from gemma_edge.cli import int_list

    p = sub.add_parser("segment-study", help="cosine of int8 segments vs float for one recipe "
                                             "(the measurements of docs/quantization.md)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--artifacts", required=True, type=Path, help="a float export (tokenizer, table)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--smoothing", type=_alphas, default=None,
                   help="SmoothQuant alphas: attention input, V, MLP input, GELU product "
                        "(default: the export's)")
    p.add_argument("--mlp-host-sum", action=argparse.BooleanOptionalAction, default=None,
                   help="the MLP segment returns its partial outputs (the two ranges of "
                        "--mlp-split) and the host adds them in float "
                        "(--no-mlp-host-sum: an int8 ADD in the graph; default: the export's)")
    p.add_argument("--mlp-split", type=float, default=None,
                   help="two-range GELU product: the fine int8 tensor saturates at this "
                        "fraction of the product's range, the excess rides in a second "
                        "one (0: one tensor; default: the export's)")
    p.add_argument("--softmax-split", type=float, default=None,
                   help="two-range softmax weights: the fine int8 tensor saturates at this "
                        "fraction of the row maximum (0: one tensor; default: the export's)")
    p.add_argument("--softmax-split-from", type=int, default=None, metavar="TOKENS",
                   help="the smallest bucket that uses --softmax-split (default: the export's)")
    p.add_argument("--host-attention-upto", type=int, default=None, metavar="TOKENS",
                   help="buckets up to this many tokens split the attention, its core on the "
                        "host in float (default: the shipped recipe's; 0: none)")
    p.add_argument("--calibration", type=int, default=32, help="corpus samples")
    p.add_argument("--ranges", default=RangeStatistic.MOVING_AVERAGE.value,
                   choices=[r.value for r in RangeStatistic],
                   help="per-tensor activation range from the samples' ranges")
    p.add_argument("--ladder", type=int_list, default=None,
                   help="buckets the segments exist for, e.g. 64,256 (the export's "
                        "--edgetpu-seq-len): calibration texts are those this bucket serves")
    p.add_argument("--texts", type=int, default=24, help="texts to compare")
    p.add_argument("--eval-texts", choices=("heldout", "corpus"), default="heldout",
                   help="compare on held-out texts (measuring) or on every 10th corpus text, "
                        "held back from the calibration (choosing a recipe); the cosine "
                        "study only (--tensor-snr reads held-out documents that fill the "
                        "bucket)")
    p.add_argument("--tensor-snr", type=int_list, default=None, metavar="LAYERS",
                   help="instead of the end-to-end cosine: the SNR of every int8 tensor of "
                        "these layers' segments against their float graphs, e.g. 1,12,23")
    p.add_argument("--kinds", type=_kinds, default=list(KINDS),
                   help="segments quantised (others stay float): attn, mlp or both")
    p.set_defaults(func=_run)
