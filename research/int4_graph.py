"""Research (issue 22): a real CPU graph with int4 weights (GPTQ, or Hadamard-rotated) on
chosen linears.

``build``: the float encoder with the chosen linears' weights replaced by their int4 grid
values (``int4-gptq --save``'s .npz) converted as the export converts (every bucket in
one file), quantised with dynamic int8 weights everywhere and dynamic int4 on those
linears (``export.gptq.mixed_recipe``); then every INT4 tensor of the graph is read back
and compared, code for code and scale for scale (bytes), with the chosen ones.

``quantize``: no torch conversion: the export's float multi-signature graph quantised
with dynamic int8 weights everywhere and dynamic int4 on the chosen layers' linears
(``--layers``, ``--linears mlp,attn``, selected by a regex on the op names), by default
with ai-edge-quantizer's Hadamard rotation (``dynamic_wi4c_hr_afp32``: the rotation of
the inputs is inserted into the graph); the INT4 tensors are counted per signature.
``ops``: a graph's ops per signature and whether XNNPACK takes every node.

``eval``: that graph and the export's int8 graph on the same device inputs (the float
export's host: tokenizer, token table), each text alone in its bucket: cosine to the float
encoder (the reference ``int4-gptq`` cached), and the graph alone's latency per call,
the two graphs' calls interleaved on the held-out queries.

``artifacts``: a copy of an export (links to its files) whose one-file int8 graph is
this one, for ``gemma-edge bench`` and the peak-RSS probe of a fresh Embedder process::

    python -m research int4-graph build --checkpoint /work/ckpt --artifacts /work/art \\
        --codes build/int4/gptq_mlp-dense.npz --out build/int4/int4_all.tflite
    python -m research int4-graph eval --artifacts /work/art --graph build/int4/int4_all.tflite
    python -m research int4-graph quantize --artifacts /work/art --layers 5-10,12-15 \\
        --graph build/int4/hr_mlp10.tflite
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


def quantize_mixed(float_model: bytes, recipe: list | None = None) -> bytes:
    """``float_model`` quantised with ``recipe`` (default ``mixed_recipe()``: int4 on the
    marked ``Int4Linear`` ops), the quantiser's own printing kept quiet."""
    import contextlib
    import io

    from ai_edge_quantizer import quantizer

    from gemma_edge.export.gptq import mixed_recipe

    qt = quantizer.Quantizer(bytearray(float_model))
    qt.load_quantization_recipe(recipe if recipe is not None else mixed_recipe())
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


# --- ai-edge-quantizer's Hadamard-rotated int4 on chosen linears of the float graph ---

LINEAR_KINDS = {"mlp": ("gate_up_proj", "down_proj"), "attn": ("qkv_proj", "o_proj")}


def parse_layers(spec: str, num_layers: int = 24) -> list[int]:
    """``"all"`` or ``"5-10,12-15"`` (inclusive ranges, single numbers) -> sorted layers."""
    if spec == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        layers.update(range(int(lo), int(hi or lo) + 1))
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise ValueError(f"layers {spec!r} outside 0..{num_layers - 1}")
    return sorted(layers)


def linear_regex(layers: Sequence[int], kinds: Sequence[str] = ("mlp",)) -> str:
    """A recipe regex for the FULLY_CONNECTED ops of these linears in the float export's
    graph: the quantiser matches (``re.search``) an op's scope, its output tensors' names
    joined and ended by ``;``, and litert-torch names a linear's output
    ``...encoder.EncoderLayer_<i>/torch.nn.modules.linear.Linear_<name>;1``."""
    names = [n for k in kinds for n in LINEAR_KINDS[k]]
    ids = "|".join(str(i) for i in sorted(layers))
    return rf"\bEncoderLayer_(?:{ids})/torch\.nn\.modules\.linear\.Linear_(?:{'|'.join(names)});"


def quantize_graph(float_model: bytes, layers: Sequence[int], kinds: Sequence[str] = ("mlp",),
                   hadamard: bool = True) -> bytes:
    """``float_model`` quantised with ``mixed_recipe`` on these layers' linears: int4 with
    the Hadamard rotation, or (``hadamard=False``) the plain min/max grid."""
    from gemma_edge.export.gptq import mixed_recipe

    return quantize_mixed(float_model, mixed_recipe(linear_regex(layers, kinds), hadamard))


def graph_ops(model: bytes, regex: str | None = None) -> dict[str, Any]:
    """Per subgraph: op counts, INT4 weight tensors, the FULLY_CONNECTED ops whose scope
    matches ``regex``, the float square constants (the Hadamard matrices) by size; the
    INT4 buffers (distinct: the signatures share weights) and their parameters."""
    import re
    from collections import Counter

    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    root = schema.Model.GetRootAs(model, 0)
    codes = [root.OperatorCodes(i) for i in range(root.OperatorCodesLength())]
    out: dict[str, Any] = {"subgraphs": {}}
    int4_buffers: dict[int, int] = {}
    for s in range(root.SubgraphsLength()):
        sub = root.Subgraphs(s)
        ops: Counter = Counter()
        matched = 0
        for i in range(sub.OperatorsLength()):
            op = sub.Operators(i)
            c = codes[op.OpcodeIndex()]
            name = names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())]
            ops[name] += 1
            if regex and name == "FULLY_CONNECTED":
                scope = "".join(sub.Tensors(op.Outputs(j)).Name().decode() + ";"
                                for j in range(op.OutputsLength()) if op.Outputs(j) >= 0)
                matched += bool(re.search(regex, scope))
        int4 = 0
        squares: Counter = Counter()
        for t in range(sub.TensorsLength()):
            ten = sub.Tensors(t)
            shape = tuple(int(d) for d in ten.ShapeAsNumpy()) if ten.ShapeLength() else ()
            if ten.Type() == schema.TensorType.INT4:
                int4 += 1
                int4_buffers[ten.Buffer()] = int(np.prod(shape))
            elif (ten.Type() == schema.TensorType.FLOAT32 and len(shape) == 2
                  and shape[0] == shape[1] and b"hadamard" in (ten.Name() or b"")):
                squares[shape[0]] += 1
        out["subgraphs"][(sub.Name() or b"").decode() or str(s)] = {
            "ops": dict(sorted(ops.items())), "int4_tensors": int4,
            "fc_matching_regex": matched, "hadamard_matrices_by_size": dict(squares)}
    out["int4_buffers"] = len(int4_buffers)
    out["int4_params"] = sum(int4_buffers.values())
    return out


def quantize_float(art_dir: Path, float_graph: Path | None, layers: Sequence[int],
                   kinds: Sequence[str], hadamard: bool, out: Path) -> dict[str, Any]:
    """The float export's multi-signature graph (no torch conversion) quantised with
    ``mixed_recipe`` on these layers' linears; the selection proved by counting."""
    src = float_graph or art_dir / "encoder_float.tflite"
    regex = linear_regex(layers, kinds)
    float_model = src.read_bytes()
    before = graph_ops(float_model, regex)
    started = time.perf_counter()
    quantized = quantize_graph(float_model, layers, kinds, hadamard)
    quant_s = time.perf_counter() - started
    del float_model
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(quantized)
    after = graph_ops(quantized)
    first = next(iter(before["subgraphs"]))
    return {"graph": str(out), "source": str(src), "bytes": len(quantized), "regex": regex,
            "layers": list(layers), "kinds": list(kinds), "hadamard": hadamard,
            "quantise_seconds": quant_s,
            "fc_matching_regex": {k: v["fc_matching_regex"]
                                  for k, v in before["subgraphs"].items()},
            "int4_tensors": {k: v["int4_tensors"] for k, v in after["subgraphs"].items()},
            "int4_buffers": after["int4_buffers"], "int4_params": after["int4_params"],
            "ops_before": before["subgraphs"][first]["ops"],
            "ops_after": after["subgraphs"][first]["ops"],
            "hadamard_matrices_by_size": {k: v["hadamard_matrices_by_size"]
                                          for k, v in after["subgraphs"].items()}}


def delegation(graph: Path) -> dict[str, Any]:
    """Which nodes of the first subgraph (the smallest bucket's signature) XNNPACK, the
    Interpreter's default delegate, takes: the original nodes by op, and each DELEGATE
    node's non-constant inputs and its outputs. One DELEGATE node whose non-constant
    inputs are the subgraph's inputs and whose outputs are its outputs: every node runs
    in XNNPACK (``_get_ops_details`` covers subgraph 0 only)."""
    from collections import Counter

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    data = graph.read_bytes()
    root = schema.Model.GetRootAs(data, 0)
    sg = root.Subgraphs(0)
    buffers = [root.Buffers(sg.Tensors(t).Buffer()) for t in range(sg.TensorsLength())]
    constant = {t for t, buf in enumerate(buffers)
                if buf is not None and (buf.DataLength() or buf.Size())}
    inputs = sorted(int(t) for t in sg.InputsAsNumpy())
    outputs = sorted(int(t) for t in sg.OutputsAsNumpy())
    del data, root, sg, buffers
    interp = Interpreter(model_path=str(graph), num_threads=1)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    nodes = [d for d in ops if d["op_name"] != "DELEGATE"]
    delegates = [{"inputs_not_constant": sorted(int(t) for t in d["inputs"]
                                                if int(t) not in constant),
                  "outputs": sorted(int(t) for t in d["outputs"])}
                 for d in ops if d["op_name"] == "DELEGATE"]
    return {"nodes": len(nodes),
            "nodes_by_op": dict(sorted(Counter(d["op_name"] for d in nodes).items())),
            "subgraph_inputs": inputs, "subgraph_outputs": outputs,
            "delegate_nodes": delegates,
            "all_delegated": len(delegates) == 1
            and delegates[0]["inputs_not_constant"] == inputs
            and delegates[0]["outputs"] == outputs}


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
    p = sub.add_parser("int4-graph", help="a CPU graph with int4 linears: GPTQ codes (build, "
                                          "checked bit for bit) or Hadamard-rotated (quantize "
                                          "the float graph); ops, cosine, latency, peak RSS")
    p.add_argument("action", choices=("build", "quantize", "ops", "eval", "artifacts", "rss"))
    p.add_argument("--checkpoint")
    p.add_argument("--artifacts", type=Path, required=True, help="the export (read only)")
    p.add_argument("--codes", type=Path, help="int4-gptq --save's .npz")
    p.add_argument("--graph", type=Path, default=Path("build/int4/int4_all.tflite"))
    p.add_argument("--reference", type=Path, default=Path("build/int4/reference.npz"))
    p.add_argument("--out", type=Path, default=Path("build/int4/art"),
                   help="artifacts: the folder of links to make")
    p.add_argument("--float-graph", type=Path, default=None,
                   help="quantize: the float graph (default the export's encoder_float.tflite)")
    p.add_argument("--layers", default="all", help="quantize: e.g. 5-10,12-15 (default all)")
    p.add_argument("--linears", default="mlp", help="quantize: mlp, attn or mlp,attn")
    p.add_argument("--no-hadamard", action="store_true",
                   help="quantize: plain min/max int4 instead of the Hadamard rotation")
    p.add_argument("--rounds", type=int, default=3, help="latency rounds over the queries")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    if args.action == "build":
        result = build(args.checkpoint, args.artifacts, args.codes, args.graph)
    elif args.action == "quantize":
        result = quantize_float(args.artifacts, args.float_graph, parse_layers(args.layers),
                                args.linears.split(","), not args.no_hadamard, args.graph)
    elif args.action == "ops":
        result = {**graph_ops(args.graph.read_bytes()),
                  "xnnpack": delegation(args.graph)}
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
