"""Research (issue 22): a real CPU graph with GPTQ int4 weights on chosen linears.

``build``: the float encoder with the chosen linears' weights replaced by their int4 grid
values (``int4-gptq --save``'s .npz) converted as the export converts (every bucket in
one file), quantised with dynamic int8 weights everywhere and dynamic int4 on those
linears (``export.gptq.mixed_recipe``); then every INT4 tensor of the graph is read back
and compared, code for code and scale for scale (bytes), with the chosen ones.

``eval``: that graph and the export's int8 graph on the same device inputs (the float
export's host: tokenizer, token table), each text alone in its bucket: cosine to the float
encoder (the reference ``int4-gptq`` cached), and the graph alone's latency per call,
the two graphs' calls interleaved on the held-out queries.

``artifacts``: a copy of an export (links to its files) whose one-file int8 graph is
this one, for ``gemma-edge bench`` and the peak-RSS probe of a fresh Embedder process::

    python -m research int4-graph build --checkpoint /work/ckpt --artifacts /work/art \\
        --codes build/int4/gptq_mlp-dense.npz --out build/int4/int4_all.tflite
    python -m research int4-graph eval --artifacts /work/art --graph build/int4/int4_all.tflite
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def build(checkpoint: str, art_dir: Path, codes_path: Path, out: Path) -> dict[str, Any]:
    import torch

    from gemma_edge.export import gptq
    from gemma_edge.export.convert import convert_buckets
    from gemma_edge.export.encoder import BucketEncoder

    from .int4_gptq import Model, load_codes

    torch.set_grad_enabled(False)
    manifest = json.loads((art_dir / "manifest.json").read_text())
    shared = next(g for g in manifest["graphs"] if g["role"] == "int8-shared")
    buckets, slots, penalty = shared["seq_lens"], shared["pool_slots"], shared["mask_penalty"]
    model = Model(checkpoint)
    weights = load_codes(codes_path)
    linears = model.linears()
    for name, w in weights.items():
        linears[name].weight.data = w
        gptq.mark_int4(linears[name])
    started = time.perf_counter()
    core = model.core
    modules = {t: BucketEncoder(core, t, penalty).eval() for t in buckets}
    float_model = convert_buckets(modules, core.spec.hidden_size, slots).model_content()
    convert_s = time.perf_counter() - started
    started = time.perf_counter()
    quantized = quantize_mixed(float_model)
    quant_s = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(quantized)
    check = check_codes(quantized, codes_path)
    return {"graph": str(out), "bytes": len(quantized), "buckets": buckets,
            "convert_seconds": convert_s, "quantise_seconds": quant_s, **check}


def quantize_mixed(float_model: bytes) -> bytes:
    import contextlib
    import io

    from ai_edge_quantizer import quantizer

    from gemma_edge.export.gptq import mixed_recipe

    qt = quantizer.Quantizer(bytearray(float_model))
    qt.load_quantization_recipe(mixed_recipe())
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return bytes(qt.quantize(None, enable_progress_report=False).quantized_model)


def check_codes(graph: bytes, codes_path: Path) -> dict[str, Any]:
    """Every chosen linear's codes and scales found bit for bit among the graph's INT4
    tensors, and no other INT4 tensor."""
    from gemma_edge.export.gptq import int4_tensors

    data = np.load(codes_path)
    names = sorted({k.rsplit(".", 1)[0] for k in data.files})
    wanted = {(data[f"{n}.codes"].astype(np.int8).tobytes(),
               data[f"{n}.scales"].astype(np.float32).tobytes()): n for n in names}
    found = {(c.tobytes(), s.tobytes()) for _, c, s in int4_tensors(graph)}
    return {"int4_linears_chosen": len(names),
            "int4_tensors_in_graph_distinct": len(found),
            "bit_exact_found": sum(k in found for k in wanted),
            "unexpected_int4_tensors": len(found - set(wanted))}


class GraphRunner:
    """One graph's signature runners, a text alone in the smallest bucket that holds it."""

    def __init__(self, path: Path, threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(path), num_threads=threads)
        self.runners = {int(k.rsplit("_", 1)[1]): self.interp.get_signature_runner(k)
                        for k in self.interp.get_signature_list()}
        self.buckets = sorted(self.runners)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def __call__(self, feed: dict[str, np.ndarray], seq_len: int) -> np.ndarray:
        return self.runners[seq_len](**feed)["embedding"][0, 0]


def evaluate(art_dir: Path, graph: Path, reference: Path, latency_rounds: int = 3
             ) -> dict[str, Any]:
    from gemma_edge.device import Embedder
    from gemma_edge.export.calibration import text_inputs

    from .int4_gptq import scores, text_sets

    texts = text_sets(art_dir, 1)
    host = Embedder(art_dir, backend="cpu", precision="float")
    ref_data = np.load(reference)
    ref = {k: ref_data[k] for k in ("dev", "queries", "documents")}
    graphs = {"int8": GraphRunner(art_dir / "encoder_int8_all.tflite"),
              "int4": GraphRunner(graph)}
    out: dict[str, Any] = {"bytes": {"int8": (art_dir / "encoder_int8_all.tflite").stat().st_size,
                                     "int4": graph.stat().st_size}}
    embedded: dict[str, dict[str, np.ndarray]] = {n: {} for n in graphs}
    for split in ("dev", "queries", "documents"):
        feeds = [(text_inputs(host, [ids], graphs["int8"].bucket(len(ids))),
                  graphs["int8"].bucket(len(ids))) for ids in texts[split]]
        for name, g in graphs.items():
            embedded[name][split] = np.stack([g(f, t) for f, t in feeds])
    for name in graphs:
        out[name] = scores(embedded[name], ref, texts)
    # latency: the held-out queries one per call, the two graphs' calls interleaved
    feeds = [(text_inputs(host, [ids], graphs["int8"].bucket(len(ids))),
              graphs["int8"].bucket(len(ids))) for ids in texts["queries"]]
    for f, t in feeds[:3]:  # warm-up (XNNPACK packs weights at the first call)
        for g in graphs.values():
            g(f, t)
    times: dict[str, dict[int, list[float]]] = {n: {} for n in graphs}
    order = list(graphs)
    for r in range(latency_rounds):
        for i, (f, t) in enumerate(feeds):
            for name in (order if (i + r) % 2 == 0 else order[::-1]):
                started = time.perf_counter()
                graphs[name](f, t)
                times[name].setdefault(t, []).append((time.perf_counter() - started) * 1e3)
    out["latency_ms"] = {name: {"all_p50": float(np.median(sum(per.values(), []))),
                                **{str(t): {"p50": float(np.median(v)), "calls": len(v)}
                                   for t, v in sorted(per.items())}}
                         for name, per in times.items()}
    out["latency_ratio_p50"] = out["latency_ms"]["int4"]["all_p50"] / \
        out["latency_ms"]["int8"]["all_p50"]
    return out


def make_artifacts(art_dir: Path, graph: Path, out: Path) -> Path:
    """``out``: symlinks to every file of ``art_dir`` but the one-file int8 graph, which is
    ``graph``; the manifest's hash and size of that file updated (nothing in ``art_dir``
    is written)."""
    from gemma_edge.atomic_files import sha256_file
    from gemma_edge.export.quantize import SHARED_INT8

    out.mkdir(parents=True, exist_ok=True)
    for src in art_dir.rglob("*"):
        rel = src.relative_to(art_dir)
        dst = out / rel
        if src.is_dir() or rel.name in ("manifest.json", SHARED_INT8) or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), dst)
    target = out / SHARED_INT8
    if target.exists() or target.is_symlink():
        target.unlink()
    os.symlink(graph.resolve(), target)
    manifest = json.loads((art_dir / "manifest.json").read_text())
    manifest["files"][SHARED_INT8] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


PEAK_RSS_PROBE = """
import sys, json
from gemma_edge.device import Embedder
from gemma_edge.device.bench import bulk_texts
from gemma_edge.datasets import load_heldout
emb = Embedder(sys.argv[1], precision="int8")
queries, _ = load_heldout()
for q in queries:
    emb.encode_query([q["text"]])
texts = bulk_texts(1000)
for i in range(0, len(texts), 64):
    emb.encode_document(texts[i:i + 64])
status = open("/proc/self/status").read()
kb = {l.split(":")[0]: int(l.split()[1]) for l in status.splitlines() if l.startswith("Vm")}
print(json.dumps({"VmHWM_MB": kb["VmHWM"] / 1024, "VmRSS_MB": kb["VmRSS"] / 1024}))
"""


def peak_rss(art_dirs: Sequence[Path]) -> dict[str, Any]:
    """VmHWM of a fresh process per artifacts folder: an int8 Embedder (one-file graph,
    weight cache), the held-out queries one by one, then 1,000 bulk documents in batches
    of 64 (the bench's mix)."""
    import subprocess
    import sys

    out = {}
    for art in art_dirs:
        res = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE, str(art)], check=True,
                             capture_output=True, text=True)
        out[str(art)] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("int4-graph", help="a CPU graph with GPTQ int4 linears: build and "
                                          "check bit for bit, cosine, latency, peak RSS")
    p.add_argument("action", choices=("build", "eval", "artifacts", "rss"))
    p.add_argument("--checkpoint")
    p.add_argument("--artifacts", type=Path, required=True, help="the export (read only)")
    p.add_argument("--codes", type=Path, help="int4-gptq --save's .npz")
    p.add_argument("--graph", type=Path, default=Path("build/int4/int4_all.tflite"))
    p.add_argument("--reference", type=Path, default=Path("build/int4/reference.npz"))
    p.add_argument("--out", type=Path, default=Path("build/int4/art"),
                   help="artifacts: the folder of links to make")
    p.add_argument("--rounds", type=int, default=3, help="latency rounds over the queries")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    if args.action == "build":
        result = build(args.checkpoint, args.artifacts, args.codes, args.graph)
    elif args.action == "eval":
        result = evaluate(args.artifacts, args.graph, args.reference, args.rounds)
    elif args.action == "artifacts":
        result = {"artifacts": str(make_artifacts(args.artifacts, args.graph, args.out))}
    else:
        result = peak_rss([args.artifacts, args.out])
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0
