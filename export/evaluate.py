"""``gemma-edge eval``: how much of float EmbeddingGemma each exported precision keeps.

Against float sentence-transformers on the project's held-out multilingual
retrieval set (never used for calibration): per-text cosine (mean, min, 1st
percentile), retrieval Recall@1 / MRR / nDCG@10 float vs quantised, per MRL dim
and per query language; for graphs whose largest bucket cuts texts the reference
embeds whole (the full-int8 segments stop at 256 tokens), also the cosine against
the reference cut at the same length; and optionally a per-layer sensitivity report (SNR of
every tensor of the quantised graph vs the float graph, grouped by layer and op
group). Writes JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.device.embedder import document_text
from gemma_edge.graph_entries import PRECISION_ROLE

from .eval_report import plot_report, print_report
from .eval_tail import TAIL_TARGET, select_short, short_entry, tail_failures, tail_summary


def _doc_texts(docs: Sequence[dict[str, Any]]) -> list[str]:
    return [document_text(d["text"], d.get("title")) for d in docs]


def evaluate(art_dir: Path, checkpoint_dir: Path, precisions: Sequence[str],
             dims: Optional[Sequence[int]] = None, quick: bool = False,
             pack_tokens: Optional[int] = None, short_prompts: Sequence[str] = (),
             short_every: int = 1, threshold: float = TAIL_TARGET) -> dict[str, Any]:
    """``pack_tokens``: the Embedder's packing budget (None: its default; 0: every text
    in its own bucket, as a one-by-one caller sees it). ``short_prompts``: embed the
    held-out short sentences (every ``short_every``-th per language) with each of these
    prompts of the model (none: skip them). ``threshold``: the tail target; the report's
    "tail" sums every held-out text per precision at every Matryoshka dimension."""
    from gemma_edge.datasets import load_heldout, load_short_heldout
    from gemma_edge.device import Embedder
    from gemma_edge.device.embedder import truncate_dim
    from gemma_edge.errors import InputError
    from gemma_edge.manifest import graphs_for_role, load_manifest

    from . import verify
    from .metrics import retrieval_metrics, same_ranking_share

    manifest = load_manifest(art_dir)
    queries, docs = load_heldout()
    unknown = [p for p in short_prompts if p not in manifest.get("prompts", {})]
    if unknown:
        raise InputError(f"short-sentence prompts {unknown} unknown; this model has "
                         f"{', '.join(sorted(manifest.get('prompts', {})))}")
    if short_every < 1:
        raise InputError(f"short_every {short_every}: at least 1 (every sentence)")
    short_rows = select_short(load_short_heldout(), short_every) if short_prompts else []
    s_texts = [r["text"] for r in short_rows]
    tail_dims = [int(d) for d in manifest["model"]["mrl_dims"]]
    short_seconds: dict[str, float] = {}  # wall time of the short sentences' part
    if quick:  # every query, every document (distractors matter), fewer dims
        dims = dims or [manifest["model"]["output_dim"], min(manifest["model"]["mrl_dims"])]
    dims = [int(d) for d in (dims or manifest["model"]["mrl_dims"])]
    doc_index = {d["id"]: i for i, d in enumerate(docs)}
    relevant = [[doc_index[r] for r in q["relevant"]] for q in queries]
    q_texts = [q["text"] for q in queries]
    d_texts = _doc_texts(docs)

    max_tokens = max(manifest["buckets"])

    def embed_reference() -> tuple[Any, np.ndarray, np.ndarray, dict[str, np.ndarray], float]:
        started = time.perf_counter()
        model = verify.reference_model(Path(checkpoint_dir), max_tokens)
        ref_q = verify.reference_embeddings(model, q_texts, "query")
        ref_d = verify.reference_embeddings(model, d_texts, None)
        short_started = time.perf_counter()
        ref_s = {p: verify.reference_embeddings(model, s_texts, p) for p in short_prompts}
        if short_prompts:  # the short sentences' own share, for the export's time budget
            short_seconds["reference"] = time.perf_counter() - short_started
        return model, ref_q, ref_d, ref_s, time.perf_counter() - started

    report: dict[str, Any] = {"queries": len(queries), "documents": len(docs),
                              "pack_tokens": pack_tokens,
                              "dims": dims, "precisions": {}, "seconds": {}}
    langs = sorted({q["lang"] for q in queries})
    # The float reference (PyTorch) runs in a thread beside the quantised graphs (TFLite):
    # both release the GIL, and the full-int8 emulation alone kept ~1.4 of 2 cores busy.
    # Each "seconds" entry is the wall time of its own part; they overlap.
    embedded = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        reference_job = pool.submit(embed_reference)
        for precision in precisions:
            if not graphs_for_role(manifest, PRECISION_ROLE[precision]):
                continue
            started = time.perf_counter()
            emb = Embedder(art_dir, backend="cpu", precision=precision, weight_cache=False,
                           pack_tokens=pack_tokens)
            short_started = time.perf_counter()
            ours_s = {p: emb.encode(s_texts, prompt_name=p) for p in short_prompts}
            if short_prompts:
                short_seconds[precision] = time.perf_counter() - short_started
            embedded.append((precision, emb, emb.encode_query(q_texts),
                             emb.encode(d_texts, prompt=""), ours_s))
            report["seconds"][precision] = time.perf_counter() - started
        reference, ref_q, ref_d, ref_s, report["seconds"]["reference"] = reference_job.result()
    tail_parts: dict[str, dict[int, list[np.ndarray]]] = {}
    if short_rows:
        report["short"] = {"texts": len(short_rows), "every": short_every,
                           "prompts": list(short_prompts), "threshold": threshold,
                           "languages": dict(Counter(r["lang"] for r in short_rows)),
                           "ids": [r["id"] for r in short_rows],
                           "langs": [r["lang"] for r in short_rows],
                           "seconds": short_seconds, "truncated": {}, "precisions": {}}
    for precision, emb, ours_q, ours_d, ours_s in embedded:
        # A graph set with a smaller largest bucket (the full-int8 segments: 256 tokens)
        # truncates the texts the reference embeds whole: their cosine mixes the length
        # limit with the quantisation error. The same texts against the reference cut at
        # the same length separate the two.
        same = _reference_at_length(reference, emb, q_texts, d_texts, ref_q, ref_d) \
            if emb.max_tokens < max_tokens else None
        # the tail: every held-out text at every Matryoshka dim, against the reference on
        # the same tokens where the graphs cut a text (the length limit is not the tail)
        tail_parts[precision] = {}
        for dim in tail_dims:
            rq, rd = (same[0], same[1]) if same is not None else (ref_q, ref_d)
            tail_parts[precision][dim] = [
                verify.cosine_rows(truncate_dim(ours_q, dim), truncate_dim(rq, dim)),
                verify.cosine_rows(truncate_dim(ours_d, dim), truncate_dim(rd, dim))]
        if short_rows:
            report["short"]["precisions"][precision] = _short_precision(
                reference, emb, short_rows, ours_s, ref_s, dims, tail_dims, threshold,
                tail_parts[precision], report["short"]["truncated"], precision)
        per_dim: dict[str, Any] = {}
        for dim in dims:
            rq, rd = truncate_dim(ref_q, dim), truncate_dim(ref_d, dim)
            oq, od = truncate_dim(ours_q, dim), truncate_dim(ours_d, dim)
            cos = np.concatenate([verify.cosine_rows(oq, rq), verify.cosine_rows(od, rd)])
            ref_scores, our_scores = rq @ rd.T, oq @ od.T
            entry = {
                "cosine": _cosine_stats(cos),
                "reference": retrieval_metrics(ref_scores, relevant),
                "ours": retrieval_metrics(our_scores, relevant),
                "same_top10_order": same_ranking_share(ref_scores, our_scores),
                "per_language": {},
            }
            entry["mrr_delta"] = entry["ours"]["mrr"] - entry["reference"]["mrr"]
            if same is not None:
                sq, sd, truncated = same
                cut = np.concatenate([verify.cosine_rows(oq, truncate_dim(sq, dim)),
                                      verify.cosine_rows(od, truncate_dim(sd, dim))])
                entry["cosine_same_tokens"] = {**_cosine_stats(cut), "max_tokens": emb.max_tokens,
                                               "truncated_texts": truncated}
            for lang in langs:
                rows = [i for i, q in enumerate(queries) if q["lang"] == lang]
                sub = [relevant[i] for i in rows]
                entry["per_language"][lang] = {
                    "queries": len(rows),
                    "reference_mrr": retrieval_metrics(ref_scores[rows], sub)["mrr"],
                    "ours_mrr": retrieval_metrics(our_scores[rows], sub)["mrr"]}
            per_dim[str(dim)] = entry
        report["precisions"][precision] = per_dim
    report["tail"] = tail_summary(tail_parts, threshold)
    return report


def _short_precision(reference: Any, emb: Any, rows: Sequence[dict[str, Any]],
                     ours: dict[str, np.ndarray], refs: dict[str, np.ndarray],
                     dims: Sequence[int], tail_dims: Sequence[int], threshold: float,
                     tail: dict[int, list[np.ndarray]], truncated: dict[str, int],
                     precision: str) -> dict[str, Any]:
    """One precision's short-sentence entries per prompt and dim; their cosines join the
    tail at every Matryoshka dim. A sentence the graphs cut (none on the real model: they
    are 16-35 tokens) is compared with the reference cut at the same length."""
    from gemma_edge.device.embedder import truncate_dim

    from . import verify

    texts = [r["text"] for r in rows]
    out: dict[str, Any] = {}
    for prompt, vectors in ours.items():
        ids, cut = emb.tokenizer.encode([emb.prompts[prompt] + t for t in texts], emb.max_tokens)
        tokens = [len(i) for i in ids]
        ref = refs[prompt]
        if any(cut):
            ref = _reference_cut(reference, emb.max_tokens, texts, ref, prompt, cut)
            truncated[precision] = truncated.get(precision, 0) + sum(cut)
        cos = {dim: verify.cosine_rows(truncate_dim(vectors, dim), truncate_dim(ref, dim))
               for dim in {*dims, *tail_dims}}
        for dim in tail_dims:
            tail[dim].append(cos[dim])
        out[prompt] = {str(dim): short_entry(cos[dim], rows, tokens, threshold) for dim in dims}
    return out


def _cosine_stats(cos: np.ndarray) -> dict[str, float]:
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "p1": float(np.percentile(cos, 1))}


def _reference_at_length(reference: Any, emb: Any, q_texts: Sequence[str],
                         d_texts: Sequence[str], ref_q: np.ndarray, ref_d: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Reference embeddings with every text cut at ``emb.max_tokens`` (as the Embedder
    cuts it: BOS and EOS kept), and how many texts that changes. Only the cut texts are
    re-embedded."""
    out, truncated = [], 0
    for texts, ref, prompt_name in ((q_texts, ref_q, "query"), (d_texts, ref_d, None)):
        prompt = emb.prompts.get(prompt_name, "") if prompt_name else ""
        _, cut = emb.tokenizer.encode([prompt + t for t in texts], emb.max_tokens)
        out.append(_reference_cut(reference, emb.max_tokens, texts, ref, prompt_name, cut))
        truncated += sum(map(bool, cut))
    return out[0], out[1], truncated


def _reference_cut(reference: Any, max_tokens: int, texts: Sequence[str], ref: np.ndarray,
                   prompt_name: Optional[str], cut: Sequence[bool]) -> np.ndarray:
    """``ref`` with the rows whose texts were ``cut`` re-embedded at ``max_tokens``."""
    from . import verify

    rows = [i for i, c in enumerate(cut) if c]
    ref = ref.copy()
    if rows:
        saved = reference.max_seq_length
        reference.max_seq_length = max_tokens
        try:
            ref[rows] = verify.reference_embeddings(reference, [texts[i] for i in rows],
                                                    prompt_name)
        finally:
            reference.max_seq_length = saved
    return ref


# -- per-layer sensitivity ------------------------------------------------------------------
_LAYER = re.compile(r"(?:EncoderLayer_|layers[._/])(\d+)")
_GROUPS = (("attention", ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
                          "softmax", "attention", "rope")),
           ("mlp", ("gate_proj", "up_proj", "down_proj", "gelu")),
           ("norm", ("norm",)),
           ("head", ("dense", "pool")))


def op_group(tensor_name: str) -> tuple[str, str]:
    """(layer, group) of a tensor name as litert-torch names them.

    Names are module paths (``.../EncoderLayer_3/torch.nn.modules.linear.Linear_qkv_proj;``);
    a fused tensor lists several, separated by ';', and the first is its own.
    """
    own = tensor_name.split(";")[0]
    match = _LAYER.search(own)
    layer = f"layer {int(match.group(1)):02d}" if match else "outside layers"
    lowered = own.lower()
    group = next((g for g, keys in _GROUPS if any(k in lowered for k in keys)), "other")
    return layer, group


def sensitivity(checkpoint_dir: Path, art_dir: Path, precision: str, seq_len: int,
                samples: int = 4) -> dict[str, Any]:
    """Mean SNR (dB) of the quantised graph's tensors vs float, per layer and op group."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.utils import validation_utils

    from gemma_edge.manifest import find_graph, load_manifest

    from .calibration import calibration_set
    from .checkpoint import load_checkpoint
    from .convert import convert_buckets
    from .encoder import BucketEncoder, build_encoder

    manifest = load_manifest(art_dir)
    graph = find_graph(manifest, PRECISION_ROLE[precision], seq_len)
    if graph is None:
        raise ValueError(f"no {precision} graph for bucket {seq_len}")
    core, _ = build_encoder(load_checkpoint(checkpoint_dir))
    if graph.get("layout") == "segments":  # per segment: the error each one adds
        from .segments.sensitivity import segment_sensitivity

        return segment_sensitivity(core, Path(art_dir), graph,
                                   calibration_set(art_dir, [seq_len], samples)[seq_len])
    float_model = convert_buckets(
        {seq_len: BucketEncoder(core, seq_len, graph.get("mask_penalty", 1e4)).eval()},
        core.spec.hidden_size, int(graph["pool_slots"])).model_content()
    quantized = (Path(art_dir) / graph["path"]).read_bytes()
    qt = quantizer.Quantizer(bytearray(float_model), previous_quantized_model=bytearray(quantized))
    data = calibration_set(art_dir, [seq_len], samples)[seq_len]
    result = qt.validate({f"encode_{seq_len}": data},
                         error_metrics=[validation_utils.ValidationErrorMetric.SNR],
                         num_threads=2)
    groups: dict[str, list[float]] = defaultdict(list)
    for name, metrics in result.get_all_tensor_results().items():
        snr = metrics.get("snr") if isinstance(metrics, dict) else None
        if snr is None or not np.isfinite(snr):
            continue
        layer, group = op_group(name)
        # ai-edge-quantizer reports SNR as a power ratio; dB reads better and averages sanely.
        groups[f"{layer} / {group}"].append(10.0 * float(np.log10(max(float(snr), 1e-12))))
    return {key: {"mean_snr_db": float(np.mean(v)), "min_snr_db": float(np.min(v)),
                  "tensors": len(v)} for key, v in sorted(groups.items())}


def run(args: argparse.Namespace) -> int:
    from gemma_edge.errors import InputError, VerificationError
    from gemma_edge.reporting import check_report_paths, save_report

    from .checkpoint import resolve_checkpoint

    check_report_paths(args.json, args.plot)
    if args.fail_below is not None and not 0.0 < args.fail_below <= 1.0:
        raise InputError(f"--fail-below {args.fail_below}: a cosine in (0, 1], e.g. 0.97")
    if args.short_every < 1:
        raise InputError(f"--short-every {args.short_every}: at least 1 (1: every sentence)")
    ckpt = resolve_checkpoint(args.checkpoint)
    prompts = [] if args.short_prompts == "none" else \
        [p for p in args.short_prompts.split(",") if p]
    report = evaluate(args.artifacts, ckpt, args.precisions.split(","), args.dims,
                      pack_tokens=args.pack_tokens, short_prompts=prompts,
                      short_every=args.short_every)
    print_report(report)
    if args.sensitivity:
        report["sensitivity"] = sensitivity(ckpt, args.artifacts, args.sensitivity_precision,
                                            args.sensitivity_bucket)
        worst = sorted(report["sensitivity"].items(), key=lambda kv: kv[1]["mean_snr_db"])[:8]
        print("least faithful layer/op groups (mean SNR, dB):")
        for key, value in worst:
            print(f"  {key:<28} {value['mean_snr_db']:6.1f}")
    save_report(report, args.json, args.plot, plot_report)
    if args.fail_below is not None:
        failures = tail_failures(report["tail"], args.fail_below)
        if failures:
            raise VerificationError("; ".join(failures) + f" (--fail-below {args.fail_below:g}; "
                                    f"the report is in {args.json})")
        print(f"tail check passed: every held-out text >= {args.fail_below:g} at every dimension")
    return 0


def register(sub: Any) -> None:
    from gemma_edge.cli import int_list

    p = sub.add_parser("eval", help="fidelity and retrieval quality of each precision vs float")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--checkpoint", required=True, help="the checkpoint the export came from")
    p.add_argument("--dims", type=int_list, default=None, help="default: the model's MRL dims")
    p.add_argument("--precisions", default="float,int8,full-int8")
    p.add_argument("--pack-tokens", type=int, default=None,
                   help="packing budget of the Embedder (default: its own; 0: one text per call)")
    p.add_argument("--short-prompts", default="document,query",
                   help="prompts the held-out short sentences are embedded with (comma list of "
                        "the model's prompt names; 'none': skip them)")
    p.add_argument("--short-every", type=int, default=1,
                   help="every N-th short sentence of each language (default 1: all 1,216)")
    p.add_argument("--fail-below", type=float, default=None, metavar="COSINE",
                   help="exit with an error (code 3) when any precision's held-out minimum "
                        "cosine to float is below COSINE at any Matryoshka dimension (CI)")
    p.add_argument("--sensitivity", action="store_true",
                   help="per-layer SNR of the quantised graph vs float (converts one bucket)")
    p.add_argument("--sensitivity-precision", default="int8", choices=("int8", "full-int8"))
    p.add_argument("--sensitivity-bucket", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("build/eval.json"))
    p.add_argument("--plot", type=Path, default=Path("build/eval.png"))
    p.set_defaults(func=run)
