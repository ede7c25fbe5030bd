"""Research (issue 22): int4 weights chosen with calibration data (GPTQ), in torch fake-quant.

The float encoder (export/encoder.py) with chosen linears' weights replaced by their
int4 values on ai-edge-quantizer's per-channel grid (``export/gptq.py``), each text run
alone at its own length (no padding), against the float encoder (itself
sentence-transformers to >= 0.9999999). Variants: round to nearest as the converter
rounds (``rtn``), GPTQ (``gptq``) on the MLP linears (``mlp``: gate_up_proj,
down_proj), the attention projections (``attn``: qkv_proj, o_proj) and the Dense head
(``dense``). GPTQ runs layer by layer: each layer's Hessians come from the inputs the
already quantised layers below it produce, over corpus calibration texts
(``segment_study.split_corpus``'s calibration rows); the Dense head's from the mean-pooled
outputs of the quantised encoder on the same texts (and the means of random spans of
them). ``--act-int8`` also quantises every linear's input
per row to int8 at run time (asymmetric, as XNNPACK's dynamic ``qd8`` kernels do), so
that the figures model the CPU graph rather than the weights alone.

Reported on the held-back corpus texts (``dev``: for choosing) and on the held-out
retrieval set (``heldout``: reporting only): cosine to float mean / min / p1 at 768-d
and 128-d (Matryoshka), MRR at both. From a checkout::

    python -m research int4-gptq --checkpoint /work/ckpt --artifacts ART \\
        --variants rtn:mlp,gptq:mlp,gptq:mlp+dense --save build/int4
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

# torch is imported inside the functions: the parser is built without it.

PARTS = {"mlp": ("gate_up_proj", "down_proj"), "attn": ("qkv_proj", "o_proj")}
METHODS = ("rtn", "gptq", "rtn8")  # rtn8: int8 per-channel round to nearest (the shipped grid)


def parse_variant(text: str) -> tuple[str, tuple[str, ...], Optional[frozenset[int]]]:
    """``method:part+part[@layers]`` (e.g. ``gptq:mlp+dense``, ``gptq:mlp@0-5,9``) ->
    (method, parts, the encoder layers quantised or None for all)."""
    method, _, rest = text.partition(":")
    parts, _, layer_text = rest.partition("@")
    names = tuple(p for p in parts.split("+") if p)
    if method not in METHODS or not names or any(p not in (*PARTS, "dense") for p in names):
        raise ValueError(f"{text!r}: METHOD:PART[+PART...][@LAYERS], METHOD in {METHODS}, "
                         f"PART in {(*PARTS, 'dense')}, LAYERS e.g. 0-5,9")
    layers: Optional[frozenset[int]] = None
    if layer_text:
        chosen = set()
        for piece in layer_text.split(","):
            lo, _, hi = piece.partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
        layers = frozenset(chosen)
    return method, names, layers


def split_variants(text: str) -> list[str]:
    """``--variants``: commas separate variants, not the layers of one (``gptq:mlp@5-10,12``)."""
    import re

    methods = "|".join(METHODS)
    return re.split(rf",(?=(?:{methods}):)", text)


class Model:
    """The float encoder, its token table, and one-text-at-a-time forward passes."""

    def __init__(self, checkpoint: str):
        from gemma_edge.export.checkpoint import load_checkpoint
        from gemma_edge.export.encoder import build_encoder

        self.core, self.table = build_encoder(load_checkpoint(checkpoint))
        self.core.requires_grad_(False)
        self._buckets: dict[int, Any] = {}
        self.float_weights = {name: mod.weight.detach().clone()
                              for name, mod in self.linears().items()}
        self._act_hooks: list[Any] = []

    def linears(self) -> dict[str, Any]:
        """Every linear the graph runs, by name (``layers.3.down_proj``, ``dense.0``)."""
        out = {}
        for i, layer in enumerate(self.core.layers):
            for names in PARTS.values():
                for n in names:
                    out[f"layers.{i}.{n}"] = getattr(layer, n)
        for i, d in enumerate(self.core.dense):
            out[f"dense.{i}"] = d
        return out

    def bucket(self, seq_len: int) -> Any:
        from gemma_edge.export.encoder import BucketEncoder

        if seq_len not in self._buckets:
            self._buckets[seq_len] = BucketEncoder(self.core, seq_len).eval()
        return self._buckets[seq_len]

    def rows(self, ids: Sequence[int]) -> Any:
        import torch

        return self.table[torch.tensor(list(ids))] * self.bucket(len(ids)).embed_scale

    def layer_inputs(self, seq_len: int) -> list[Any]:
        import torch

        return self.bucket(seq_len).layer_inputs(torch.ones(1, seq_len, seq_len))

    def encode(self, ids_list: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit vectors [N, D] of the texts, each alone at its own length."""
        import torch

        out = []
        with torch.no_grad():
            for ids in ids_list:
                t = len(ids)
                emb = self.table[torch.tensor(list(ids))][None]
                v = self.bucket(t)(emb, torch.ones(1, t, t), torch.ones(1, 1, t))[0, 0]
                out.append(v.numpy())
        return np.stack(out)

    def set_weights(self, weights: dict[str, Any]) -> None:
        """Replace these linears' weights; every other linear gets its float weight back."""
        for name, mod in self.linears().items():
            mod.weight.data = weights.get(name, self.float_weights[name]).float().contiguous()

    def act_int8(self, on: bool) -> None:
        """Quantise every linear's input per row to int8 (asymmetric) at run time."""
        for h in self._act_hooks:
            h.remove()
        self._act_hooks = []
        if on:
            for mod in self.linears().values():
                self._act_hooks.append(mod.register_forward_pre_hook(
                    lambda _m, args: (fake_int8_rows(args[0]),)))


def fake_int8_rows(x: Any) -> Any:
    """Per-row asymmetric int8 quantise-dequantise (range including 0), as dynamic range
    quantisation of activations does."""
    import torch

    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
    zero = torch.round(-128.0 - lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127)
    return (q - zero) * scale


def mlp_act(layer: Any, m: Any) -> Any:
    """The down_proj input ``gelu(gate) * up`` of the MLP for the residual stream ``m``."""
    import torch

    gu = layer.gate_up_proj(layer.pre_ff_norm(m))
    gate, up = gu[:, :layer.intermediate], gu[:, layer.intermediate:]
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def quantise(model: Model, method: str, parts: Sequence[str], cal_ids: Sequence[Sequence[int]],
             dense_spans: int = 8, act_order: bool = True, damp: float = 0.01,
             clip: float = 1.0, log: Any = print, layers: Optional[frozenset[int]] = None,
             sequential: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """{linear name: GPTQResult} for ``parts`` and per-linear statistics.

    GPTQ is sequential: the model's weights are replaced layer by layer as they are
    quantised, so later layers see earlier layers' int4 outputs. The statistics give,
    for every quantised linear, the output error of GPTQ and of round to nearest on the
    same grid relative to the output's energy (``tr(W H W^T)``) over the calibration
    inputs."""
    import torch

    from gemma_edge.export import gptq as G

    results: dict[str, Any] = {}
    stats: list[dict[str, Any]] = []
    model.set_weights({})
    if method in ("rtn", "rtn8"):
        for name in model.linears():
            part = "dense" if name.startswith("dense") else \
                next(p for p, ns in PARTS.items() if name.rsplit(".", 1)[-1] in ns)
            layer_no = int(name.split(".")[1]) if name.startswith("layers.") else None
            if part in parts and (layers is None or layer_no is None or layer_no in layers):
                w = model.float_weights[name]
                results[name] = G.rtn(w) if method == "rtn" else rtn_int8(w)
        model.set_weights({n: r.weight() for n, r in results.items()})
        return results, stats

    def solve(name: str, h: Any) -> None:
        w = model.float_weights[name]
        res = G.gptq(w, h, G.row_scales(w, clip), damp=damp, act_order=act_order)
        near = G.rtn(w, res.scales)
        energy = float(torch.einsum("oi,ij,oj->", w.double(), h, w.double()) / 2)
        stats.append({"linear": name, "gptq": G.output_error(w, res.weight(), h) / energy,
                      "rtn": G.output_error(w, near.weight(), h) / energy,
                      "forced": res.forced})
        results[name] = res
        if sequential:
            model.linears()[name].weight.data = res.weight()

    with torch.no_grad():
        xs = [model.rows(ids) for ids in cal_ids]
        per_text = [model.layer_inputs(len(ids)) for ids in cal_ids]
        for li, layer in enumerate(model.core.layers):
            started = time.perf_counter()
            inputs = [p[li] for p in per_text]
            here = set(parts) if layers is None or li in layers else set()
            if "attn" in here:
                h = sum(G.hessian(layer.input_norm(x)) for x in xs)
                solve(f"layers.{li}.qkv_proj", h)
                h = sum(G.hessian(layer.attention_heads(layer.input_norm(x), *inp))
                        for x, inp in zip(xs, inputs))
                solve(f"layers.{li}.o_proj", h)
            mids = [x + layer.post_attn_norm(layer.attention(layer.input_norm(x), *inp))
                    for x, inp in zip(xs, inputs)]
            if "mlp" in here:
                h = sum(G.hessian(layer.pre_ff_norm(m)) for m in mids)
                solve(f"layers.{li}.gate_up_proj", h)

            if "mlp" in here:
                h = sum(G.hessian(mlp_act(layer, m)) for m in mids)
                solve(f"layers.{li}.down_proj", h)
            xs = [m + layer.post_ff_norm(layer.down_proj(mlp_act(layer, m))) for m in mids]
            mine = [s for s in stats if s["linear"].startswith(f"layers.{li}.")]
            if mine:
                log(f"  layer {li:2d}: {time.perf_counter() - started:5.1f} s, "
                    + ", ".join(f"{s['linear'].rsplit('.', 1)[-1]} {s['gptq']:.2e} "
                                f"(rtn {s['rtn']:.2e})" for s in mine), flush=True)
        if "dense" in parts:
            # The Dense head sees one pooled vector per text: too few calibration texts for
            # its 768- and 3072-wide Hessians, so the means of random spans of each text's
            # final states (as a shorter text's would be) are added.
            rng = np.random.default_rng(0)
            pooled = []
            for x in xs:
                f = model.core.final_norm(x)
                pooled.append(f.mean(0, keepdim=True))
                for _ in range(dense_spans if len(f) > 8 else 0):
                    a = int(rng.integers(0, len(f) - 4))
                    b = int(rng.integers(a + 4, len(f) + 1))
                    pooled.append(f[a:b].mean(0, keepdim=True))
            p = torch.cat(pooled)
            for i, d in enumerate(model.core.dense):
                solve(f"dense.{i}", G.hessian(p))
                p = d(p)
            log(f"  dense ({len(pooled)} pooled vectors): "
                + ", ".join(f"{s['linear']} {s['gptq']:.2e} (rtn {s['rtn']:.2e})"
                            for s in stats[-2:]), flush=True)
    return results, stats


def rtn_int8(weight: Any) -> Any:
    """int8 per-channel round to nearest (the shipped CPU graph's weights): absmax / 127."""
    import torch

    from gemma_edge.export.gptq import GPTQResult

    s = torch.clamp(weight.abs().amax(dim=1), min=1e-9) / 127.0
    codes = torch.clamp(torch.round(weight / s[:, None]), -127, 127)

    class Int8(GPTQResult):
        def weight(self) -> Any:
            return self.codes.float() * self.scales[:, None]

    return Int8(codes.to(torch.int16), s.float(), 0)  # type: ignore[arg-type]


# -- texts -------------------------------------------------------------------------------

def text_sets(art_dir: Path, calibration: int) -> dict[str, Any]:
    """Token ids: calibration (spread over the corpus' calibration rows), dev (held back),
    held-out queries and documents with their relevance lists."""
    from gemma_edge.datasets import load_heldout
    from gemma_edge.device import Embedder
    from gemma_edge.device.embedder import document_text
    from gemma_edge.export.calibration import corpus_token_ids

    from .segment_study import split_corpus

    emb = Embedder(art_dir, backend="cpu", precision="float")
    cal_rows, dev_rows = split_corpus()
    cal_all = corpus_token_ids(emb, cal_rows)

    def spread(ids: list[Any], n: int) -> list[Any]:
        step = max(1, len(ids) // n)
        return ids[::step][:n]

    queries, docs = load_heldout()
    q_ids, _ = emb.tokenizer.encode([emb.prompts["query"] + q["text"] for q in queries],
                                    emb.max_tokens)
    d_ids, _ = emb.tokenizer.encode([document_text(d["text"], d.get("title")) for d in docs],
                                    emb.max_tokens)
    index = {d["id"]: i for i, d in enumerate(docs)}
    return {"cal": spread(cal_all, calibration),
            "dev": corpus_token_ids(emb, dev_rows), "queries": q_ids, "documents": d_ids,
            "relevant": [[index[r] for r in q["relevant"]] for q in queries]}


def _unit(v: np.ndarray, dim: int) -> np.ndarray:
    cut = v[:, :dim]
    return cut / np.linalg.norm(cut, axis=1, keepdims=True)


def scores(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], texts: dict[str, Any],
           dims: Sequence[int] = (768, 128)) -> dict[str, Any]:
    """Cosine stats on dev and held-out texts, MRR on held-out, per dim."""
    from gemma_edge.export.metrics import retrieval_metrics

    out: dict[str, Any] = {}
    for dim in dims:
        for split, keys in (("dev", ("dev",)), ("heldout", ("queries", "documents"))):
            cos = np.concatenate([np.sum(_unit(ours[k], dim) * _unit(ref[k], dim), 1)
                                  for k in keys])
            out[f"{split}_{dim}"] = {"mean": float(cos.mean()), "min": float(cos.min()),
                                     "p1": float(np.percentile(cos, 1)),
                                     "below_0.98": int((cos < 0.98).sum()), "n": len(cos)}
        mrr = {}
        for name, emb in (("float", ref), ("ours", ours)):
            s = _unit(emb["queries"], dim) @ _unit(emb["documents"], dim).T
            mrr[name] = retrieval_metrics(s, texts["relevant"])["mrr"]
        out[f"heldout_{dim}"]["mrr"] = mrr["ours"]
        out[f"heldout_{dim}"]["mrr_float"] = mrr["float"]
    return out


def cached_reference(model: Model, texts: dict[str, Any], splits: Sequence[str],
                     folder: Optional[Path]) -> dict[str, np.ndarray]:
    """The float embeddings, kept in ``folder``/reference.npz with the token ids they
    belong to (reused only when the ids are the same)."""
    key = np.array([hash(tuple(tuple(i) for i in texts[k])) for k in splits])
    path = folder / "reference.npz" if folder is not None else None
    if path is not None and path.exists():
        data = np.load(path)
        if np.array_equal(data["key"], key):
            return {k: data[k] for k in splits}
    ref = embed_all(model, texts, splits)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, key=key, **ref)
    return ref


def embed_all(model: Model, texts: dict[str, Any], splits: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: model.encode(texts[k]) for k in splits}


def format_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    head = ("| variant | dev 768 mean / min / p1 | held-out 768 mean / min / p1 | "
            "held-out 128 mean / min / p1 | MRR 768 (float) | MRR 128 (float) |")
    lines = [head, "|" + "---|" * 6]
    def c(s: dict[str, Any], key: str) -> str:
        return f"{s[key]['mean']:.4f} / {s[key]['min']:.4f} / {s[key]['p1']:.4f}"

    for name, s in rows:
        lines.append(f"| {name} | {c(s, 'dev_768')} | {c(s, 'heldout_768')} | "
                     f"{c(s, 'heldout_128')} | "
                     f"{s['heldout_768']['mrr']:.4f} ({s['heldout_768']['mrr_float']:.4f}) | "
                     f"{s['heldout_128']['mrr']:.4f} ({s['heldout_128']['mrr_float']:.4f}) |")
    return "\n".join(lines)


def save_codes(path: Path, results: dict[str, Any]) -> None:
    """codes (int8) and scales (float32) per linear, for building graphs from them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, r in results.items():
        arrays[f"{name}.codes"] = r.codes.numpy()
        arrays[f"{name}.scales"] = r.scales.numpy()
    np.savez(path, **arrays)


def load_codes(path: Path) -> dict[str, Any]:
    """{linear name: float32 grid weight tensor} from ``save_codes``' file."""
    import torch

    from gemma_edge.export.gptq import grid_weights

    data = np.load(path)
    names = sorted({k.rsplit(".", 1)[0] for k in data.files})
    return {n: grid_weights(torch.from_numpy(data[f"{n}.codes"]),
                            torch.from_numpy(data[f"{n}.scales"])) for n in names}


def run_study(checkpoint: str, art_dir: Path, variants: Sequence[str], calibration: int,
              dense_spans: int, act_int8: bool, act_order: bool, damp: float,
              clip: float, save: Optional[Path], splits: Sequence[str],
              threads: int = 1) -> dict[str, Any]:
    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    texts = text_sets(art_dir, calibration)
    model = Model(checkpoint)
    started = time.perf_counter()
    ref = cached_reference(model, texts, splits, save)
    print(f"float reference: {time.perf_counter() - started:.0f} s "
          f"({', '.join(f'{k} {len(texts[k])}' for k in splits)})", flush=True)
    report: dict[str, Any] = {"calibration_texts": len(texts["cal"]),
                              "dense_spans": dense_spans,
                              "act_int8": act_int8, "act_order": act_order, "damp": damp,
                              "clip": clip, "variants": {}}
    rows = []
    for variant in variants:
        method, parts, layers = parse_variant(variant)
        started = time.perf_counter()
        print(f"{variant}: quantising", flush=True)
        results, stats = quantise(model, method, parts, texts["cal"], dense_spans,
                                  act_order, damp, clip, layers=layers)
        seconds = time.perf_counter() - started
        if save is not None and method != "rtn8":
            save_codes(save / f"{variant.replace(':', '_').replace('+', '-')}.npz", results)
        # the Dense head is quantised after the encoder, from its outputs: the same pass
        # without it is the variant without "dense" (evaluated first, no second pass)
        subsets = [(variant, results)]
        if "dense" in parts and method == "gptq" and len(parts) > 1:
            without = {n: r for n, r in results.items() if not n.startswith("dense")}
            name = variant.replace("+dense", "")
            subsets.insert(0, (name, without))
        for name, chosen in subsets:
            model.set_weights({n: r.weight() for n, r in chosen.items()})
            model.act_int8(act_int8)
            ours = embed_all(model, texts, splits)
            model.act_int8(False)
            entry = scores(ours, ref, texts) \
                if set(splits) >= {"dev", "queries", "documents"} else {}
            entry.update({"quantise_seconds": seconds,
                          "linear_errors": [s for s in stats if s["linear"] in chosen],
                          "int4_params": int(sum(r.codes.numel() for r in chosen.values()))})
            report["variants"][name] = entry
            rows.append((name + (" +act8" if act_int8 else ""), entry))
            if entry.get("dev_768"):
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if rows and rows[0][1].get("dev_768"):
        print(format_table(rows))
    return report


def sensitivity(checkpoint: str, art_dir: Path, calibration: int, count: int,
                folder: Optional[Path], threads: int = 1) -> list[dict[str, Any]]:
    """One layer's MLP at a time in GPTQ int4 (Hessians from the float model's inputs),
    the rest float: cosine to float on ``count`` held-back corpus texts (dev, for
    choosing which layers may go to int4)."""
    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    texts = text_sets(art_dir, calibration)
    model = Model(checkpoint)
    ref = cached_reference(model, texts, ("dev", "queries", "documents"), folder)["dev"]
    step = max(1, len(texts["dev"]) // count)
    pick = list(range(0, len(texts["dev"]), step))[:count]
    dev = [texts["dev"][i] for i in pick]
    results, stats = quantise(model, "gptq", ("mlp",), texts["cal"], sequential=False)
    rows = []
    for li in range(len(model.core.layers)):
        chosen = {n: r.weight() for n, r in results.items() if n.startswith(f"layers.{li}.")}
        for label, subset in (("mlp", chosen),):
            model.set_weights(subset)
            cos = np.sum(model.encode(dev) * ref[pick], 1)
            rows.append({"layer": li, "linears": label, "mean": float(cos.mean()),
                         "min": float(cos.min()),
                         "errors": [s for s in stats if s["linear"] in subset]})
            print(f"layer {li:2d} {label}: dev cosine mean {cos.mean():.5f} min {cos.min():.5f}",
                  flush=True)
    model.set_weights({})
    return rows


def register(sub: Any) -> None:
    p = sub.add_parser("int4-gptq", help="int4 weights by GPTQ vs round to nearest, torch "
                                         "fake-quant: cosine to float, MRR (issue 22)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--artifacts", required=True, type=Path,
                   help="an export (tokenizer, prompts; its graphs are not used)")
    p.add_argument("--variants", default="rtn:mlp,gptq:mlp,gptq:mlp+dense",
                   help="comma list of METHOD:PART[+PART] (METHOD rtn | gptq | rtn8; PART "
                        "mlp | attn | dense)")
    p.add_argument("--calibration", type=int, default=256,
                   help="corpus calibration texts for the layers' Hessians")
    p.add_argument("--dense-spans", type=int, default=8,
                   help="random spans per calibration text whose means add to the Dense "
                        "head's calibration vectors")
    p.add_argument("--act-int8", action="store_true",
                   help="also quantise every linear's input per row to int8 (the CPU "
                        "graph's dynamic range quantisation)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0,
                   help="scale = clip * row absmax / 7 (1: the converter's own grid)")
    p.add_argument("--save", type=Path, default=None,
                   help="folder for each variant's codes and scales (.npz)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core VM two threads waited on each "
                        "other 5-10x longer than one thread computed)")
    p.add_argument("--sensitivity", type=int, default=0, metavar="TEXTS",
                   help="instead of --variants: each layer's MLP alone in GPTQ int4, cosine "
                        "on this many held-back corpus texts")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    if args.sensitivity:
        rows = sensitivity(args.checkpoint, args.artifacts, args.calibration, args.sensitivity,
                           args.save, args.threads)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    report = run_study(args.checkpoint, args.artifacts, split_variants(args.variants),
                       args.calibration, args.dense_spans, args.act_int8,
                       args.act_order, args.damp, args.clip, args.save,
                       ("dev", "queries", "documents"), args.threads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0
