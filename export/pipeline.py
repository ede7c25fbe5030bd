"""``gemma-edge export``: checkpoint -> verified artifacts directory.

Steps: load and check the checkpoint; build the export-friendly encoder; write
the token-embedding tables and tokenizer; convert the float graph; verify it
through the device runtime against sentence-transformers; write manifest.json.
Everything happens in a staging folder that replaces ``out`` only on success.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

import gemma_edge
from gemma_edge.atomic_files import atomic_write_json, atomic_write_npy
from gemma_edge.errors import InputError
from gemma_edge.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    check_output_folder,
    describe_files,
    staged_directory,
)

from . import verify
from .checkpoint import Checkpoint, load_checkpoint
from .convert import convert_float, describe_io
from .encoder import DEFAULT_MASK_PENALTY, build_encoder
from .verify import verify_artifacts

log = logging.getLogger("gemma_edge.export")

# 16, 24 and 32 serve queries (the interactive case: a query with its prompt is ~13-37
# tokens, median 22 on the held-out set; short int8 graphs are bound by reading the ~100 MB
# of weights, and each extra 8 tokens costs ~2 ms on top, so 24 saves a typical query ~2 ms
# against 32); 512 the longest documents.
DEFAULT_BUCKETS = (16, 24, 32, 64, 128, 256, 512)
DEFAULT_POOL_SLOTS = 16
FLOAT_MIN_COSINE = 0.9999


@dataclass
class ExportOptions:
    buckets: Sequence[int] = DEFAULT_BUCKETS
    pool_slots: int = DEFAULT_POOL_SLOTS
    mask_penalty: float = DEFAULT_MASK_PENALTY
    min_cosine: float = FLOAT_MIN_COSINE
    mrl_dims: Sequence[int] = (768, 512, 256, 128)
    quantize: bool = True
    int8_min_cosine: float = 0.97
    evaluate: bool = True
    # The fully int8 Edge TPU segments (export/segments/): 48 graphs per bucket; queries
    # fit 64 tokens, most documents 128 (the 128-token set is worth +0.003 held-out
    # cosine, docs/quantization.md), long ones 256 and 512 (cut there, as the CPU graphs:
    # a document cut at 256 scored 0.959 in float). Each bucket's segments are filled
    # into two or three converted templates (export/segments/graph.py).
    edgetpu: bool = True
    edgetpu_buckets: Sequence[int] = (64, 128, 256, 512)
    edgetpu_calibration: int = 32  # corpus samples per bucket for the segments' ranges
    # The MLP's two-range GELU product (SegmentRecipe.mlp_split; None: the recipe's,
    # 0: one int8 tensor: 40 % fewer MLP weights to stream per call, lower fidelity)
    edgetpu_mlp_split: Optional[float] = None
    # The softmax weights in two int8 ranges (SegmentRecipe.softmax_split; None: the
    # recipe's, 0: one tensor)
    edgetpu_softmax_split: Optional[float] = None
    # Buckets up to this many tokens with the attention core on the host
    # (SegmentRecipe.host_attention_upto; None: the recipe's, 0: none)
    edgetpu_host_attention_upto: Optional[int] = None

    def validate(self, max_positions: Optional[int] = None, config_path: Any = "config.json"
                 ) -> None:
        """Refuse bad options before any work; ``max_positions`` (the checkpoint's
        max_position_embeddings, read from ``config_path``) bounds the bucket lengths: a
        longer bucket cannot be encoded and would try to allocate its attention masks
        (tens of GB for 100000 tokens) before failing."""
        self.buckets = _buckets("--seq-len", self.buckets, max_positions, config_path)
        if self.quantize and self.edgetpu:
            self.edgetpu_buckets = _buckets("--edgetpu-seq-len", self.edgetpu_buckets,
                                            max_positions, config_path)
        self.segment_recipe()
        if not self.pool_slots >= 1:
            raise InputError(f"--pool-slots {self.pool_slots}: must be at least 1 (the number "
                             f"of texts one graph run can pool; default {DEFAULT_POOL_SLOTS})")
        if self.pool_slots > self.buckets[-1]:
            raise InputError(f"--pool-slots {self.pool_slots}: at most the largest bucket "
                             f"({self.buckets[-1]} tokens): every pooled text takes a token")


    def segment_recipe(self) -> Any:
        """The full-int8 segments' ``SegmentRecipe``: the shipped one with the split
        flags applied, validated (an InputError names the --edgetpu- flag)."""
        from .segments.recipe import DEFAULT_RECIPE

        return DEFAULT_RECIPE.with_splits(self.edgetpu_mlp_split, self.edgetpu_softmax_split,
                                          self.edgetpu_host_attention_upto
                                          ).validate("--edgetpu-")


def _buckets(flag: str, given: Sequence[int], max_positions: Optional[int],
             config_path: Any) -> list[int]:
    """``given`` sorted and deduplicated, each in [8, max_positions], or an InputError."""
    buckets = sorted(set(int(b) for b in given))
    if not buckets:
        raise InputError(f"{flag}: no bucket length given; pass comma-separated token counts")
    if buckets[0] < 8:
        raise InputError(f"{flag} {buckets[0]}: each bucket must be >= 8 tokens")
    if max_positions is not None and buckets[-1] > max_positions:
        raise InputError(f"{flag} {buckets[-1]}: longer than the model's {max_positions} "
                         f"positions (max_position_embeddings in {config_path}); pass "
                         f"buckets of at most {max_positions} tokens")
    return buckets


def mrl_dims_for(output_dim: int, requested: Sequence[int]) -> list[int]:
    dims = sorted({output_dim} | {int(d) for d in requested if int(d) < output_dim}, reverse=True)
    return dims


def _write_tables(table: Any, out: Path, steps: tqdm) -> dict[str, Any]:
    steps.set_description("writing token-embedding tables")
    from gemma_edge.device.table import quantize_rows_int8

    raw = table.numpy().astype(np.float32)
    atomic_write_npy(out / "token_embeddings.f16.npy", raw.astype(np.float16))
    q, scales = quantize_rows_int8(raw)
    atomic_write_npy(out / "token_embeddings.i8.npy", q)
    atomic_write_npy(out / "token_embeddings.i8_scales.npy", scales)
    return {
        "float": {"path": "token_embeddings.f16.npy", "dtype": "float16"},
        "int8": {"path": "token_embeddings.i8.npy", "scales": "token_embeddings.i8_scales.npy",
                 "dtype": "int8"},
    }


def _tokenizer_spec(ck: Checkpoint, out: Path, probe_texts: Sequence[str]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    for name in ck.tokenizer_files:
        shutil.copy2(ck.root / name, out / name)
    fast = Tokenizer.from_file(str(ck.root / "tokenizer.json"))
    with_special = fast.encode("a").ids
    plain = fast.encode("a", add_special_tokens=False).ids
    spec = {
        "bos_id": fast.token_to_id("<bos>"), "eos_id": fast.token_to_id("<eos>"),
        "pad_id": fast.token_to_id("<pad>"),
        "add_bos": with_special[:1] == [fast.token_to_id("<bos>")] and plain[:1] != with_special[:1],
        "add_eos": with_special[-1:] == [fast.token_to_id("<eos>")],
        "files": list(ck.tokenizer_files),
    }
    agree, mismatches = verify.tokenizers_agree(ck.root, probe_texts)
    if agree:
        spec.update(kind="sentencepiece", file="tokenizer.model")
    else:
        if mismatches:
            log.warning("sentencepiece differs from tokenizer.json on %d texts; the device "
                        "will use tokenizer.json (more RAM)", mismatches)
        spec.update(kind="tokenizers", file="tokenizer.json")
    spec["sentencepiece_mismatches"] = mismatches
    return spec


def run_export(checkpoint: str, out: Path, options: Optional[ExportOptions] = None,
               force: bool = False) -> dict[str, Any]:
    """Export ``checkpoint`` to the artifacts folder ``out`` (see the module docstring).

    ``out`` must be new, empty or an earlier export; ``force`` lets it replace any other
    folder (never a file, nor the checkpoint's folder): checked before any work, so a
    mistyped ``--out`` costs nothing.
    """
    options = options or ExportOptions()
    options.validate()
    local = Path(checkpoint).expanduser()
    protect = [local] if local.exists() else []
    out = check_output_folder(out, force, protect)
    started = time.time()
    steps = tqdm(total=6 + int(options.quantize), desc="loading checkpoint", unit="step", leave=True)
    ck = load_checkpoint(checkpoint)
    positions = ck.config.get("max_position_embeddings")
    options.validate(int(positions) if positions is not None else None, ck.root / "config.json")
    protect.append(ck.root)
    steps.update()
    steps.set_description("building export encoder")
    core, table = build_encoder(ck)
    spec = core.spec
    steps.update()
    # (the segments' worker pool closes before the staging folder is kept or removed)
    with staged_directory(out, force, protect) as stage, contextlib.ExitStack() as background:
        tables = _write_tables(table, stage, steps)
        del table
        steps.update()

        texts = verify.SAMPLE_TEXTS + _corpus_probe_texts()
        tok_spec = _tokenizer_spec(ck, stage, texts)
        segments = None
        if options.quantize and options.edgetpu:
            segments = _start_segments(background, core, ck, stage, tables, tok_spec,
                                       options, steps)
        steps.set_description("converting float graph")
        graphs = convert_float(core, options.buckets, options.pool_slots, stage,
                               options.mask_penalty, progress=steps.set_description)
        steps.update()

        manifest = {
            "format_version": FORMAT_VERSION,
            "gemma_edge_version": gemma_edge.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"checkpoint": str(checkpoint), "resolved": str(ck.root),
                       "model_type": ck.config.get("model_type"),
                       "weights_sha256": ck.weights_sha256()},
            "model": {"hidden_size": spec.hidden_size, "output_dim": ck.output_dim,
                      "num_layers": spec.num_layers, "vocab_size": spec.vocab_size,
                      "embed_scale": spec.embed_scale, "window_radius": spec.window_radius,
                      "mrl_dims": mrl_dims_for(ck.output_dim, options.mrl_dims),
                      "dense_bias": core.dense_has_bias},
            "buckets": list(options.buckets),
            "prompts": ck.prompts,
            "tokenizer": tok_spec,
            "embedding_tables": tables,
            "graphs": [],
        }
        _add_graphs(stage, manifest, graphs)

        steps.set_description("verifying float graph vs sentence-transformers")
        manifest["verification"] = {"float": verify_artifacts(stage, ck.root, "float",
                                                              options.min_cosine)}
        steps.update()
        if options.quantize:
            _add_int8_graphs(stage, manifest, core, ck, options, steps, segments)
            steps.update()
        if options.evaluate:
            steps.set_description("quick evaluation on the held-out set")
            manifest["evaluation"] = _quick_evaluation(stage, ck.root)
        steps.set_description("done")
        manifest["export_seconds"] = round(time.time() - started, 1)
        _finalise(stage, manifest)
        steps.update()
    steps.close()
    return manifest


def _add_graphs(stage: Path, manifest: dict[str, Any], graphs: list[dict[str, Any]]) -> None:
    """Describe each new graph's I/O, list it in the manifest and rewrite manifest.json."""
    for g in graphs:
        if g.get("layout") != "segments":  # segments: their I/O is in each file
            g["io"] = describe_io(stage / g["path"])
    manifest["graphs"].extend(graphs)
    _finalise(stage, manifest)


def _start_segments(background: contextlib.ExitStack, core: Any, ck: Checkpoint, stage: Path,
                    tables: dict[str, Any], tokenizer: dict[str, Any], options: ExportOptions,
                    steps: tqdm) -> Any:
    """Start the full-int8 segments on worker processes (``SegmentBuild``), to be
    collected after the CPU int8 graphs: the float and int8 conversions run in this
    process meanwhile, mostly on one core (the previous export left the second core
    idle for a third of its time: 154 % CPU over 36 minutes)."""
    from .calibration import TextHost, calibration_from
    from .segments import SegmentBuild

    steps.set_description("full-int8 segments: calibration inputs")
    host = TextHost.from_parts(stage, ck.prompts, tokenizer, tables["float"], options.buckets,
                               core.spec.hidden_size, options.pool_slots)
    calibration = calibration_from(host, options.edgetpu_buckets, options.edgetpu_calibration)
    recipe = options.segment_recipe()
    graphs = sum(recipe.graphs_per_layer(t) for t in options.edgetpu_buckets)
    bar = tqdm(total=graphs * core.spec.num_layers, unit="segment",
               desc="full-int8 segments (worker processes)", position=1, leave=False)
    background.callback(bar.close)
    return background.enter_context(SegmentBuild(
        core, stage, options.edgetpu_buckets, calibration, recipe,
        progress=steps.set_description, on_segment_done=bar.update))


def _add_int8_graphs(stage: Path, manifest: dict[str, Any], core: Any, ck: Checkpoint,
                     options: ExportOptions, steps: tqdm, segments: Any = None) -> None:
    """The int8 graphs: role "int8" (CPU) and, when ``segments`` (a started
    ``SegmentBuild``) is given, "edgetpu" (full int8)."""
    from .quantize import build_cpu_int8

    # the multi-signature float file (convert_float falls back to one file per bucket)
    multi = [g for g in manifest["graphs"]
             if g["role"] == "float" and len(g["seq_lens"]) == len(options.buckets) > 1]
    _add_graphs(stage, manifest, build_cpu_int8(
        core, stage, options.buckets, options.pool_slots, options.mask_penalty,
        progress=steps.set_description, shared_from=stage / multi[0]["path"] if multi else None))
    steps.set_description("verifying int8 graph vs sentence-transformers")
    manifest["verification"]["int8"] = verify_artifacts(stage, ck.root, "int8",
                                                        options.int8_min_cosine)
    if segments is not None:
        steps.set_description("full-int8 segments: waiting for the workers")
        _add_graphs(stage, manifest, segments.collect())
        steps.set_description("measuring the full-int8 graphs vs sentence-transformers")
        # Recorded, not enforced: the recipe does not reach the fidelity target yet.
        manifest["verification"]["full-int8"] = verify_artifacts(stage, ck.root, "full-int8", -1.0)


def _quick_evaluation(stage: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """`gemma-edge eval`'s quick form (full and smallest MRL dim) for the manifest.

    The quantised graphs only: the float graphs were verified against the reference
    through the device path a few stages earlier (cosine >= FLOAT_MIN_COSINE, enforced), and
    re-embedding the held-out set with them took a fifth of this stage's time.
    """
    from gemma_edge.errors import CalibrationDataError

    from .eval_tail import QUICK_SHORT_EVERY, QUICK_SHORT_PROMPTS, quick_tail, tail_warnings
    from .evaluate import evaluate

    try:
        report = evaluate(stage, checkpoint_dir, ["int8", "full-int8"], quick=True,
                          short_prompts=QUICK_SHORT_PROMPTS, short_every=QUICK_SHORT_EVERY)
    except CalibrationDataError as exc:
        log.warning("held-out set not available (%s): no evaluation in the manifest", exc)
        return {"skipped": str(exc)}
    summary: dict[str, Any] = {"queries": report["queries"], "documents": report["documents"],
                               "seconds": {k: round(v, 1) for k, v in report["seconds"].items()}}
    for precision, per_dim in report["precisions"].items():
        summary[precision] = {dim: {"cosine_mean": e["cosine"]["mean"],
                                    "cosine_min": e["cosine"]["min"],
                                    "mrr": e["ours"]["mrr"], "reference_mrr": e["reference"]["mrr"],
                                    "recall@1": e["ours"]["recall@1"],
                                    "ndcg@10": e["ours"]["ndcg@10"],
                                    **_same_tokens_summary(e)}
                              for dim, e in per_dim.items()}
    summary.update(quick_tail(report))  # evaluation.tail: the held-out minimum (issue 20)
    for line in tail_warnings(summary):
        log.warning(line)
    return summary


def _same_tokens_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """The cosine against float cut at the graphs' length, when they cut texts."""
    same = entry.get("cosine_same_tokens")
    if not same:
        return {}
    return {"same_tokens": {"max_tokens": same["max_tokens"],
                            "truncated_texts": same["truncated_texts"],
                            "cosine_mean": same["mean"], "cosine_min": same["min"]}}


def _finalise(stage: Path, manifest: dict[str, Any]) -> None:
    """List and hash the stage's files, then write manifest.json.

    Called after every graph set (verification reads the manifest), so only files
    not yet listed are hashed: the export writes each file once, under a new name.
    """
    names = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*")
                   if p.is_file() and p.name != MANIFEST_NAME)
    known = manifest.get("files", {})
    fresh = describe_files(stage, [n for n in names if n not in known])
    manifest["files"] = {n: known[n] if n in known else fresh[n] for n in names}
    atomic_write_json(stage / MANIFEST_NAME, manifest)


def _corpus_probe_texts() -> list[str]:
    try:
        from gemma_edge.datasets import load_calibration_corpus

        return [row["text"] for row in load_calibration_corpus()]
    except Exception:  # noqa: BLE001 - corpus is optional for the tokenizer probe
        return []
