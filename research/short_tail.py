"""Research: where the full-int8 segments lose short texts (issue 20, ``short-tail``).

The export's full-int8 path is a host loop over per-layer int8 segments
(device/segment_host.py). This runs the same loop with any chosen set of segments in
int8 (the export's own graph files) and the rest in float (the checkpoint's layers),
on a few texts, to say *where* a text's cosine to float is lost:

- ``local``: each segment's int8 output against its float output on the same input
  (the float stream), as an SNR in dB over the text's own rows: which layer and which
  kind (attention / MLP) rounds the most for this text;
- ``attn-only`` / ``mlp-only``: the end-to-end cosine with only one kind in int8;
- ``alone`` / ``packed``: the cosine of the text run alone in the bucket and packed
  with other texts (the Embedder packs short texts into the 64-token bucket);
- ``ranges``: per segment input / output, how far the text's values reach beyond the
  int8 range the segment was calibrated for (saturation) and how much of its
  energy sits below one int8 step (rounded away).

No graph is converted: the int8 graphs are the export's. Texts: the held-out short
sentences (diagnosis only, never for choosing a recipe) or the corpus texts held back
from the calibration (``segment_study.split_corpus``). From a checkout::

    python -m research short-tail --checkpoint DIR --artifacts ART --langs ar,sw --worst 6
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

KINDS = ("attn", "mlp")


def snr_db(want: np.ndarray, got: np.ndarray) -> float:
    """10 log10(signal power / error power); NaN anywhere gives NaN (never a pass)."""
    signal = float(np.sum(np.square(want, dtype=np.float64)))
    noise = float(np.sum(np.square(got.astype(np.float64) - want)))
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return float("nan")
    return 10.0 * math.log10(max(signal, 1e-30) / max(noise, 1e-30))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def int8_range(detail: dict[str, Any]) -> tuple[float, float]:
    """The float interval an int8 tensor of ``detail`` (interpreter details) can hold."""
    scale = float(detail["quantization"][0])
    zero = int(detail["quantization"][1])
    return (-128 - zero) * scale, (127 - zero) * scale


@dataclass
class Trace:
    """What one host-loop run saw, per segment (layer, kind), for one text slot each."""

    local_snr: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    # per segment: (input absmax / int8 input limit, output absmax / int8 output limit)
    over_range: dict[tuple[int, str], list[tuple[float, float]]] = field(default_factory=dict)
    # per segment: the share of the input's energy in values below one int8 step
    below_step: dict[tuple[int, str], list[float]] = field(default_factory=dict)


class HybridHost:
    """The device's host loop (device/segment_host.py) with each segment int8 or float.

    ``core``: the checkpoint's float encoder (export.encoder.build_encoder); ``art``:
    an export with full-int8 segments at ``seq_len`` tokens.
    """

    def __init__(self, core: Any, host_file: Path, segment_files: Sequence[Path], seq_len: int):
        from ai_edge_litert.interpreter import Interpreter

        from gemma_edge.device.segment_host import SegmentGraph
        from gemma_edge.export.encoder import BucketEncoder

        with np.load(host_file) as host:
            self.host = {k: host[k] for k in host.files}
        self.paths = [Path(p) for p in segment_files]
        self.segments = [SegmentGraph(Interpreter(model_path=str(p), num_threads=1), str(p))
                         for p in self.paths]
        self.core, self.seq_len = core, seq_len
        self.encoder = BucketEncoder(core, seq_len).eval()
        # graphs per layer: attention + MLP, or a split attention's qkv + o + MLP
        self.per_layer = len(self.paths) // len(core.layers)
        self.attention = None
        if self.per_layer == 3:
            from gemma_edge.device.host_attention import HostAttention

            self.attention = HostAttention(self.host, seq_len, str(host_file))

    def _graphs(self, i: int, kind: str) -> tuple[Any, Any]:
        """(first, last) graph of layer ``i``'s ``kind`` branch: its input and output."""
        n = self.per_layer
        if kind == "mlp":
            return self.segments[n * i + n - 1], self.segments[n * i + n - 1]
        return self.segments[n * i], self.segments[n * i + n - 2]

    @classmethod
    def from_export(cls, core: Any, art: Path, seq_len: int) -> HybridHost:
        """The full-int8 segments of ``seq_len`` tokens of the export in ``art``."""
        from gemma_edge.errors import ArtifactError
        from gemma_edge.manifest import load_manifest

        entry = next((g for g in load_manifest(art)["graphs"]
                      if g.get("layout") == "segments" and seq_len in g["seq_lens"]), None)
        if entry is None:
            raise ArtifactError(f"{art}: no full-int8 segments for {seq_len} tokens; export "
                                f"with --edgetpu-seq-len {seq_len}")
        files = [Path(art) / f for f in entry["segments"] if f"_{seq_len}_" in Path(f).name]
        return cls(core, Path(art) / entry["path"], files, seq_len)

    def _float_branch(self, i: int, kind: str, h: np.ndarray, rope_bias: Any) -> np.ndarray:
        import torch

        layer = self.core.layers[i]
        t = torch.from_numpy(h.astype(np.float32))
        if kind == "attn":
            rope, bias = rope_bias
            return layer.attention(t * layer.input_norm.gain, rope, bias).double().numpy()
        gate_up = layer.gate_up_proj(t * layer.pre_ff_norm.gain)
        g, u = gate_up[:, :layer.intermediate], gate_up[:, layer.intermediate:]
        act = torch.nn.functional.gelu(g, approximate="tanh") * u
        return layer.down_proj(act).double().numpy()

    def _int8_branch(self, i: int, kind: str, h: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hs = self.host
        first, last = self._graphs(i, kind)
        if kind == "attn":
            a = h / hs["attn_in"][i]
            if self.attention is None:
                out = first(a, mask)
            else:  # the split attention: qkv graph, the host's float core, o graph
                out = last(self.attention.core(i, first(a), mask))
            return out.reshape(h.shape).astype(np.float64) * hs["attn_out"][i]
        scale = hs["ff_out"][i].reshape(-1, 1, h.shape[-1])
        out = first(h / hs["ff_in"][i]).reshape(len(scale), *h.shape)
        return (out.astype(np.float64) * scale).sum(0)

    def _ranges(self, i: int, kind: str, h: np.ndarray, out: np.ndarray, rows: np.ndarray
                ) -> tuple[float, float, float]:
        """(input over-range, output over-range, input energy below one step) on ``rows``."""
        hs = self.host
        seg, last = self._graphs(i, kind)
        x = (h / hs["attn_in" if kind == "attn" else "ff_in"][i])[rows]
        lo, hi = int8_range(seg.a)
        step = float(seg.a["quantization"][0])
        in_over = float(np.abs(x).max() / max(-lo, hi))
        below = float(np.square(x[np.abs(x) < step / 2]).sum() / max(np.square(x).sum(), 1e-30))
        if kind == "attn":
            y = out[rows] / hs["attn_out"][i]
        else:  # the partials' scale differs; the sum's over-range is the excess partial's
            y = out[rows] / hs["ff_out"][i].max(0)
        lo, hi = int8_range(last.out)
        return in_over, float(np.abs(y).max() / max(-lo, hi)), below

    def run(self, sample: dict[str, np.ndarray], int8: Iterable[tuple[int, str]],
            trace: Optional[Trace] = None) -> np.ndarray:
        """Unit vectors [S, D] (one per text slot) with the ``int8`` segments quantised.

        With ``trace`` every segment also runs the other way on the same input: the
        local SNR of int8 against float on each text's rows, and the range figures."""
        import torch

        int8 = set(int8)
        hs, eps = self.host, float(self.host["eps"])
        emb, mask, pool = sample["embeddings"], sample["mask"], sample["pool"]
        with torch.no_grad():
            per_layer = self.encoder.layer_inputs(torch.from_numpy(mask))
        x = emb[0].astype(np.float64) * float(hs["embed_scale"])
        padding = pool[0].sum(0) == 0
        x[padding] = x[0]
        slots = [np.flatnonzero(p > 0) for p in pool[0] if p.sum() > 0]

        def rms(v: np.ndarray) -> np.ndarray:
            return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)

        for i in range(len(self.core.layers)):
            for kind, gain in (("attn", hs["post_attn_gain"][i]), ("mlp", hs["post_ff_gain"][i])):
                h = rms(x)
                with torch.no_grad():
                    want = (self._float_branch(i, kind, h, per_layer[i])
                            if trace is not None or (i, kind) not in int8 else None)
                got = (self._int8_branch(i, kind, h, mask)
                       if trace is not None or (i, kind) in int8 else None)
                if trace is not None:
                    trace.local_snr.setdefault((i, kind), []).extend(
                        snr_db(want[r], got[r]) for r in slots)
                    figures = [self._ranges(i, kind, h, got, r) for r in slots]
                    trace.over_range.setdefault((i, kind), []).extend(f[:2] for f in figures)
                    trace.below_step.setdefault((i, kind), []).extend(f[2] for f in figures)
                out = got if (i, kind) in int8 else want
                x = x + rms(out) * gain
        x = rms(x) * hs["final_gain"]
        pooled = pool[0].astype(np.float64) @ x
        if int(hs["dense_mean"]):
            pooled = pooled / np.maximum(pool[0].sum(-1, keepdims=True), 1e-9)
        for k in range(int(hs["dense_count"])):
            pooled = pooled @ hs[f"dense_{k}_weight"].T.astype(np.float64)
        pooled = pooled[:len(slots)]
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

    def reference(self, sample: dict[str, np.ndarray]) -> np.ndarray:
        """The float encoder's unit vectors [S, D] for the sample's text slots."""
        import torch

        with torch.no_grad():
            out = self.encoder(*(torch.from_numpy(sample[k]) for k in ("embeddings", "mask", "pool")))
        count = int((sample["pool"][0].sum(-1) > 0).sum())
        return out[0, :count].double().numpy()


def text_rows(langs: Sequence[str], source: str) -> list[dict[str, Any]]:
    """{id, lang, text, prompt} rows: held-out short sentences or held-back corpus texts."""
    if source == "heldout-short":
        from gemma_edge.datasets import load_short_heldout

        return [dict(r, prompt="document") for r in load_short_heldout()
                if not langs or r["lang"] in langs]
    from .segment_study import split_corpus

    _, dev = split_corpus()
    return [r for r in dev if not langs or r["lang"] in langs]


def token_ids(host: Any, rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Prompt + text token ids as the device makes them (document prompt with its title)."""
    from gemma_edge.device.embedder import document_text

    texts = [document_text(r["text"], r.get("title")) if r.get("prompt", "document") == "document"
             else host.prompts.get(r["prompt"], "") + r["text"] for r in rows]
    ids, _ = host.tokenizer.encode(texts, 10 ** 6)
    return ids


def diagnose(hybrid: HybridHost, host: Any, ids: Sequence[Sequence[int]],
             partners: Sequence[Sequence[int]], seq_len: int) -> list[dict[str, Any]]:
    """Per text: cosines alone / packed / attn-only / mlp-only and the local trace."""
    from gemma_edge.export.calibration import text_inputs

    layers = len(hybrid.core.layers)
    everything = [(i, k) for i in range(layers) for k in KINDS]
    out = []
    for tid in ids:
        alone = text_inputs(host, [tid], seq_len)
        ref = hybrid.reference(alone)[0]
        trace = Trace()
        full = hybrid.run(alone, everything, trace)[0]
        row: dict[str, Any] = {
            "tokens": len(tid),
            "alone": cosine(ref, full),
            "attn_only": cosine(ref, hybrid.run(alone, [(i, "attn") for i in range(layers)])[0]),
            "mlp_only": cosine(ref, hybrid.run(alone, [(i, "mlp") for i in range(layers)])[0]),
            "local_snr": {f"{i}/{k}": round(v[0], 2) for (i, k), v in trace.local_snr.items()},
            "in_over": {f"{i}/{k}": round(v[0][0], 3) for (i, k), v in trace.over_range.items()},
            "out_over": {f"{i}/{k}": round(v[0][1], 3) for (i, k), v in trace.over_range.items()},
            "below_step": {f"{i}/{k}": round(v[0], 4) for (i, k), v in trace.below_step.items()},
        }
        group, room = [tid], seq_len - len(tid)
        for p in partners:  # pack with other texts, the text last (another position)
            if len(p) <= room and p is not tid and len(group) < host.slots:
                group.insert(0, p)
                room -= len(p)
        if len(group) > 1:
            packed = text_inputs(host, group, seq_len)
            vec = hybrid.run(packed, everything)[len(group) - 1]
            row["packed"] = cosine(hybrid.reference(packed)[len(group) - 1], vec)
            row["packed_with"] = len(group) - 1
        out.append(row)
    return out


def summary(rows: Sequence[dict[str, Any]], top: int = 8) -> str:
    """Readable table: each text's cosines and its worst segments by local SNR."""
    lines = [f"{'id':<12} {'lang':<4} {'tok':>3} {'alone':>7} {'packed':>7} {'attn8':>7} "
             f"{'mlp8':>7}  lowest local SNR (dB) segments"]
    for r in rows:
        worst = sorted(r["local_snr"].items(), key=lambda kv: kv[1])[:top]
        lines.append(f"{r['id']:<12} {r['lang']:<4} {r['tokens']:>3} {r['alone']:>7.4f} "
                     f"{r.get('packed', float('nan')):>7.4f} {r['attn_only']:>7.4f} "
                     f"{r['mlp_only']:>7.4f}  " + ", ".join(f"{k} {v:.1f}" for k, v in worst))
    return "\n".join(lines)


def _run(args: Any) -> int:
    import torch

    from gemma_edge.device import Embedder
    from gemma_edge.errors import InputError
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    langs = [x for x in (args.langs or "").split(",") if x]
    rows = text_rows(langs, args.texts)
    if args.ids:
        wanted = set(args.ids.split(","))
        rows = [r for r in rows if r["id"] in wanted]
    if not rows:
        raise InputError(f"--langs {args.langs} --ids {args.ids}: no {args.texts} text matches")
    host = Embedder(args.artifacts, backend="cpu", precision="float")
    ids = token_ids(host, rows)
    keep = [k for k, t in enumerate(ids) if len(t) <= args.seq_len]
    rows, ids = [rows[k] for k in keep], [ids[k] for k in keep]
    rows, ids = rows[:args.limit], ids[:args.limit]
    torch.set_num_threads(1)
    core, _ = build_encoder(load_checkpoint(args.checkpoint))
    hybrid = HybridHost.from_export(core, args.artifacts, args.seq_len)
    partners = token_ids(host, [dict(r, prompt="document") for r in text_rows(["en", "de", "es"],
                                                                              "heldout-short")])
    if args.texts == "corpus":
        partners = [t for t in ids if len(t) <= args.seq_len // 2]
    result = diagnose(hybrid, host, ids, partners, args.seq_len)
    for r, row in zip(result, rows):
        r.update(id=row["id"], lang=row["lang"], text=row["text"])
    print(summary(result))
    if args.json:
        from gemma_edge.atomic_files import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("short-tail", help="where the full-int8 segments lose short texts: "
                                          "per-segment SNR, packed vs alone (issue 20)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--artifacts", required=True, type=Path,
                   help="an export with full-int8 segments at --seq-len")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--texts", choices=("heldout-short", "corpus"), default="heldout-short",
                   help="held-out short sentences (diagnosis only) or corpus texts held back "
                        "from the calibration")
    p.add_argument("--langs", default="", help="comma list of languages (default: all)")
    p.add_argument("--ids", default="", help="comma list of text ids (default: all)")
    p.add_argument("--limit", type=int, default=12, help="at most this many texts")
    p.add_argument("--json", type=Path, default=None, help="per-text figures as JSON")
    p.set_defaults(func=_run)


@dataclass
class TensorRange:
    """One int8 tensor of a segment on some feeds: SNR against the float graph, and how
    the float values sit in the int8 range (saturation above, rounding below)."""

    op_index: int
    op: str
    tensor: str
    snr_db: float
    over: float      # float absmax / the int8 range's limit on that side (> 1: clipped)
    clipped: float   # share of elements beyond the int8 range
    below: float     # share of the float signal's energy in values below half a step

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def tensor_ranges(float_model: bytes, int8_model: bytes, feeds: Sequence[dict[str, np.ndarray]],
                  rows: Optional[np.ndarray] = None) -> list[TensorRange]:
    """Per int8 op output (``research.tensor_snr``'s pairing by tensor name): SNR, over-range
    and below-step figures over every feed. ``rows``: token positions to keep on the axis
    of length T that comes first in each tensor (the text's rows, not the padding)."""
    from gemma_edge.device.runtime import dequantize_output

    from .tensor_snr import _feed, _interpreter, _short

    ref, q8 = _interpreter(float_model), _interpreter(int8_model)
    float_index = {d["name"]: d for d in ref.get_tensor_details()}
    q8_details = {d["index"]: d for d in q8.get_tensor_details()}
    seq = next(d["shape"][-2] for d in q8.get_input_details() if len(d["shape"]) == 4)
    acc: dict[int, list[float]] = {}
    for feed in feeds:
        _feed(ref, feed)
        _feed(q8, feed)
        for op in q8._get_ops_details():
            for t in op["outputs"]:
                d = q8_details[t]
                f = float_index.get(d["name"])
                if (f is None or tuple(f["shape"]) != tuple(d["shape"])
                        or not d["quantization"][0]):
                    continue
                want = ref.get_tensor(f["index"]).astype(np.float64)
                got = dequantize_output(q8.get_tensor(t), d).astype(np.float64)
                if rows is not None:
                    axis = next((a for a, n in enumerate(want.shape) if n == seq), None)
                    if axis is not None:
                        want, got = np.take(want, rows, axis), np.take(got, rows, axis)
                lo, hi = int8_range(d)
                step = float(d["quantization"][0])
                a = acc.setdefault(t, [op["index"], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
                a[1] += float(np.square(want).sum())
                a[2] += float(np.square(got - want).sum())
                a[3] = max(a[3], float(want.max() / hi) if hi > 0 else 0.0,
                           float(want.min() / lo) if lo < 0 else 0.0)
                a[4] += float(((want > hi + step / 2) | (want < lo - step / 2)).sum())
                a[5] += float(np.square(want[np.abs(want) < step / 2]).sum())
                a[6] += want.size
    ops = {op["index"]: op["op_name"] for op in q8._get_ops_details()}
    return [TensorRange(a[0], ops[a[0]], _short(q8_details[t]["name"]),
                        10.0 * math.log10(max(a[1], 1e-30) / max(a[2], 1e-30)), a[3],
                        a[4] / max(a[6], 1.0), a[5] / max(a[1], 1e-30))
            for t, a in sorted(acc.items(), key=lambda kv: kv[1][0])]


def segment_feeds(hybrid: HybridHost, sample: dict[str, np.ndarray], layer: int, kind: str
                  ) -> dict[str, np.ndarray]:
    """The input of segment (``layer``, ``kind``) for ``sample`` on the float stream, as
    the device feeds it (divided by the segment's input scale)."""
    seen: dict[str, np.ndarray] = {}
    original = hybrid._float_branch

    def spy(i: int, k: str, h: np.ndarray, rope_bias: Any) -> np.ndarray:
        if (i, k) == (layer, kind):
            scale = hybrid.host["attn_in" if k == "attn" else "ff_in"][i]
            x = (h / scale).astype(np.float32).reshape(1, 1, *h.shape)
            seen.update({"a": x, "mask": sample["mask"]} if k == "attn" else {"b": x})
        return original(i, k, h, rope_bias)

    hybrid._float_branch = spy  # type: ignore[method-assign]
    try:
        hybrid.run(sample, [])
    finally:
        hybrid._float_branch = original  # type: ignore[method-assign]
    return seen


def segment_graphs(hybrid: HybridHost, art: Path, layer: int, kind: str) -> tuple[bytes, bytes]:
    """(float graph converted from the checkpoint with the export's scales, the export's
    int8 graph) of one segment."""
    from gemma_edge.errors import InputError
    from gemma_edge.export.segments import float_segment, layer_segments, scales_from_host

    if kind == "attn" and hybrid.attention is not None:
        raise InputError(f"{hybrid.seq_len}-token segments: the attention is split (its core "
                         "runs on the host in float); tensor SNR reads one-graph segments")
    scales = scales_from_host(hybrid.host)
    module = layer_segments(hybrid.core, hybrid.seq_len, scales)[layer][KINDS.index(kind)]
    graph = float_segment(kind, module, hybrid.seq_len, hybrid.core.spec.hidden_size)
    n = hybrid.per_layer
    return graph, hybrid.paths[n * layer + (n - 1 if kind == "mlp" else 0)].read_bytes()
