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
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.device.embedder import document_text

PRECISION_ROLE = {"float": "float", "int8": "int8", "full-int8": "edgetpu"}


def _doc_texts(docs: Sequence[dict[str, Any]]) -> list[str]:
    return [document_text(d["text"], d.get("title")) for d in docs]


def evaluate(art_dir: Path, checkpoint_dir: Path, precisions: Sequence[str],
             dims: Optional[Sequence[int]] = None, quick: bool = False,
             pack_tokens: Optional[int] = None) -> dict[str, Any]:
    """``pack_tokens``: the Embedder's packing budget (None: its default; 0: every text
    in its own bucket, as a one-by-one caller sees it)."""
    from gemma_edge.datasets import load_heldout
    from gemma_edge.device import Embedder
    from gemma_edge.device.embedder import truncate_dim
    from gemma_edge.manifest import graphs_for_role, load_manifest

    from . import verify
    from .metrics import retrieval_metrics, same_ranking_share

    manifest = load_manifest(art_dir)
    queries, docs = load_heldout()
    if quick:  # every query, every document (distractors matter), fewer dims
        dims = dims or [manifest["model"]["output_dim"], min(manifest["model"]["mrl_dims"])]
    dims = [int(d) for d in (dims or manifest["model"]["mrl_dims"])]
    doc_index = {d["id"]: i for i, d in enumerate(docs)}
    relevant = [[doc_index[r] for r in q["relevant"]] for q in queries]
    q_texts = [q["text"] for q in queries]
    d_texts = _doc_texts(docs)

    max_tokens = max(manifest["buckets"])

    def embed_reference() -> tuple[Any, np.ndarray, np.ndarray, float]:
        started = time.perf_counter()
        model = verify.reference_model(Path(checkpoint_dir), max_tokens)
        ref_q = verify.reference_embeddings(model, q_texts, "query")
        ref_d = verify.reference_embeddings(model, d_texts, None)
        return model, ref_q, ref_d, time.perf_counter() - started

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
            embedded.append((precision, emb, emb.encode_query(q_texts),
                             emb.encode(d_texts, prompt="")))
            report["seconds"][precision] = time.perf_counter() - started
        reference, ref_q, ref_d, report["seconds"]["reference"] = reference_job.result()
    for precision, emb, ours_q, ours_d in embedded:
        # A graph set with a smaller largest bucket (the full-int8 segments: 256 tokens)
        # truncates the texts the reference embeds whole: their cosine mixes the length
        # limit with the quantisation error. The same texts against the reference cut at
        # the same length separate the two.
        same = _reference_at_length(reference, emb, q_texts, d_texts, ref_q, ref_d) \
            if emb.max_tokens < max_tokens else None
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
    return report


def _cosine_stats(cos: np.ndarray) -> dict[str, float]:
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "p1": float(np.percentile(cos, 1))}


def _reference_at_length(reference: Any, emb: Any, q_texts: Sequence[str],
                         d_texts: Sequence[str], ref_q: np.ndarray, ref_d: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Reference embeddings with every text cut at ``emb.max_tokens`` (as the Embedder
    cuts it: BOS and EOS kept), and how many texts that changes. Only the cut texts are
    re-embedded."""
    from . import verify

    out, truncated = [], 0
    for texts, ref, prompt_name in ((q_texts, ref_q, "query"), (d_texts, ref_d, None)):
        prompt = emb.prompts.get(prompt_name, "") if prompt_name else ""
        _, cut = emb.tokenizer.encode([prompt + t for t in texts], emb.max_tokens)
        rows = [i for i, c in enumerate(cut) if c]
        ref = ref.copy()
        if rows:
            saved = reference.max_seq_length
            reference.max_seq_length = emb.max_tokens
            try:
                ref[rows] = verify.reference_embeddings(reference, [texts[i] for i in rows],
                                                        prompt_name)
            finally:
                reference.max_seq_length = saved
        out.append(ref)
        truncated += len(rows)
    return out[0], out[1], truncated


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
        from .segment_build import segment_sensitivity

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


# -- report ---------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    print(f"held-out set: {report['queries']} queries, {report['documents']} documents")
    if report.get("seconds"):
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    for precision, per_dim in report["precisions"].items():
        for dim, e in per_dim.items():
            c, r, o = e["cosine"], e["reference"], e["ours"]
            print(f"{precision:>9} @ {dim:>4}: cosine mean {c['mean']:.4f} min {c['min']:.4f} "
                  f"p1 {c['p1']:.4f} | MRR {o['mrr']:.4f} (float ST {r['mrr']:.4f}, "
                  f"delta {e['mrr_delta']:+.4f}) R@1 {o['recall@1']:.3f} "
                  f"nDCG@10 {o['ndcg@10']:.4f} | same top-10 {e['same_top10_order']:.2f}")
            same = e.get("cosine_same_tokens")
            if same:
                print(f"{'':>17} against float on the same {same['max_tokens']} tokens "
                      f"({same['truncated_texts']} texts cut): cosine mean {same['mean']:.4f} "
                      f"min {same['min']:.4f} p1 {same['p1']:.4f}")


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gemma_edge.reporting import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for precision, per_dim in report["precisions"].items():
        dims = [int(d) for d in per_dim]
        left.plot(dims, [per_dim[str(d)]["ours"]["mrr"] for d in dims], "o-", label=precision)
        right.plot(dims, [per_dim[str(d)]["cosine"]["min"] for d in dims], "o-", label=precision)
        same = [per_dim[str(d)].get("cosine_same_tokens") for d in dims]
        if all(same):
            right.plot(dims, [x["min"] for x in same], "o:",  # type: ignore[index]
                       label=f"{precision}, float cut at {same[0]['max_tokens']} tokens")  # type: ignore[index]
    any_prec = next(iter(report["precisions"].values()), {})
    dims = [int(d) for d in any_prec]
    if dims:
        left.plot(dims, [any_prec[str(d)]["reference"]["mrr"] for d in dims], "k--",
                  label="float sentence-transformers")
    for ax, title in ((left, "MRR on held-out retrieval"), (right, "min cosine to float")):
        ax.set_xlabel("Matryoshka dimension")
        ax.set_title(title)
        ax.invert_xaxis()
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    from gemma_edge.reporting import save_report

    from .checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    report = evaluate(args.artifacts, ckpt, args.precisions.split(","), args.dims,
                      pack_tokens=args.pack_tokens)
    print_report(report)
    if args.sensitivity:
        report["sensitivity"] = sensitivity(ckpt, args.artifacts, args.sensitivity_precision,
                                            args.sensitivity_bucket)
        worst = sorted(report["sensitivity"].items(), key=lambda kv: kv[1]["mean_snr_db"])[:8]
        print("least faithful layer/op groups (mean SNR, dB):")
        for key, value in worst:
            print(f"  {key:<28} {value['mean_snr_db']:6.1f}")
    save_report(report, args.json, args.plot, plot_report)
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
    p.add_argument("--sensitivity", action="store_true",
                   help="per-layer SNR of the quantised graph vs float (converts one bucket)")
    p.add_argument("--sensitivity-precision", default="int8", choices=("int8", "full-int8"))
    p.add_argument("--sensitivity-bucket", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("build/eval.json"))
    p.add_argument("--plot", type=Path, default=Path("build/eval.png"))
    p.set_defaults(func=run)
