"""``gemma-edge``: one console script, one subcommand per job.

Heavy modules (torch, litert-torch) are imported inside the handlers, so the
device-side subcommands (embed, bench, search, classify) start fast on a board.
The CLI decides what is fatal: a GemmaEdgeError prints its message and exits
with its code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import GemmaEdgeError, InputError

Handler = Callable[[argparse.Namespace], int]


def int_list(text: str) -> list[int]:
    """argparse type: "16,32,64" -> [16, 32, 64], a usage error otherwise."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from exc


# -- export --------------------------------------------------------------------------------
def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="checkpoint -> verified TFLite artifacts directory")
    p.add_argument("--checkpoint", required=True,
                   help="local sentence-transformers directory, or a hub id when online")
    p.add_argument("--out", required=True, type=Path,
                   help="artifacts folder to write; an existing one is replaced only when it "
                        "is empty or an earlier export (holds its manifest.json)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is a non-empty folder of other files, "
                        "deleting them; never a file, the checkpoint's folder, the current "
                        "or the home directory")
    p.add_argument("--seq-len", type=int_list, default=None,
                   help="bucket lengths in tokens (default 16,24,32,64,128,256,512)")
    p.add_argument("--pool-slots", type=int, default=None,
                   help="texts one graph run can pool (packing of short texts; default 16)")
    p.add_argument("--no-quantize", action="store_true", help="float graph only")
    p.add_argument("--edgetpu-seq-len", type=int_list, default=None,
                   help="buckets of the fully int8 Edge TPU segments (default 64,128,256,512; "
                        "48 graphs per bucket, see docs/quantization.md)")
    p.add_argument("--edgetpu-mlp-split", type=float, default=None, metavar="F",
                   help="the segments' GELU product as two int8 tensors, the fine one "
                        "saturating at this fraction of its range (default 0.125; 0: one "
                        "tensor, less Edge TPU time, lower fidelity: docs/quantization.md)")
    p.add_argument("--edgetpu-softmax-split", type=float, default=None, metavar="R",
                   help="the segments' softmax weights as two int8 tensors, the fine one "
                        "saturating at this fraction of the row maximum (default 0.125; 0: one "
                        "tensor, fewer attention ops, lower fidelity: docs/quantization.md)")
    p.add_argument("--edgetpu-host-attention-upto", type=int, default=None, metavar="TOKENS",
                   help="segment buckets of at most this many tokens compute the attention "
                        "core (softmax) on the host in float between two int8 projection "
                        "segments (default 64; 0: none; docs/quantization.md)")
    p.add_argument("--no-edgetpu", action="store_true",
                   help="skip the fully int8 Edge TPU segments (~13 minutes of the real export)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the quick held-out evaluation recorded in the manifest")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export.pipeline import ExportOptions, run_export

    options = ExportOptions(quantize=not args.no_quantize, evaluate=not args.no_eval,
                            edgetpu=not args.no_edgetpu)
    # `is not None`: an empty list or 0 is a value to refuse (validate), not "the default"
    if args.seq_len is not None:
        options.buckets = args.seq_len
    if args.edgetpu_seq_len is not None:
        options.edgetpu_buckets = args.edgetpu_seq_len
    if args.pool_slots is not None:
        options.pool_slots = args.pool_slots
    options.edgetpu_mlp_split = args.edgetpu_mlp_split
    options.edgetpu_softmax_split = args.edgetpu_softmax_split
    options.edgetpu_host_attention_upto = args.edgetpu_host_attention_upto
    manifest = run_export(args.checkpoint, args.out, options, force=args.force)
    ver = manifest.get("verification", {})
    print(f"wrote {args.out} in {manifest['export_seconds']} s")
    for role, stats in ver.items():
        print(f"  {role}: min cosine to sentence-transformers {stats['min_cosine']:.6f} "
              f"over {stats['texts']} texts x 2 prompts")
    for precision, per_dim in (manifest.get("evaluation") or {}).items():
        if isinstance(per_dim, dict) and per_dim and all(k.isdigit() for k in per_dim):
            figures = "; ".join(f"{d}-d cosine mean {e['cosine_mean']:.4f} min {e['cosine_min']:.4f} "
                                f"MRR {e['mrr']:.3f} (float {e['reference_mrr']:.3f})"
                                for d, e in per_dim.items())
            print(f"  held-out {precision}: {figures}")
    from .export.eval_tail import tail_warnings  # the held-out minimum (issue 20)

    for line in tail_warnings(manifest.get("evaluation")):
        print(line, file=sys.stderr)
    return 0


# -- embed ---------------------------------------------------------------------------------
def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed texts from a file into a .npy matrix")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path,
                   help="one text per line, or .jsonl with a 'text' field")
    p.add_argument("--output", required=True, type=Path, help="where to write the .npy")
    p.add_argument("--prompt", default="query",
                   help="query | document | any prompt name of the model | none")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka dimension (768/512/256/128)")
    _add_runtime_args(p)
    p.set_defaults(func=_run_embed)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("auto", "cpu", "edgetpu"), default="auto")
    p.add_argument("--precision", choices=("auto", "float", "int8", "full-int8"), default="auto",
                   help="auto (default): int8 when the artifacts have it, else float")
    p.add_argument("--threads", type=int, default=None, help="CPU interpreter threads")
    p.add_argument("--device", default=None, help="Edge TPU device: ':0', 'usb', 'pci'")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of each artifact file at its first open (hashed "
                        "once, then remembered; boards that must start fast; sizes are still "
                        "checked)")


def read_texts(path: Path) -> list[str]:
    """Texts from a .txt (one per line) or .jsonl ({"text": ...}) file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from exc
    if path.suffix == ".jsonl":
        from .datasets import iter_jsonl

        texts = []
        for number, row in iter_jsonl(path, content.splitlines(), InputError):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f"{path}:{number}: expected an object with a string 'text'")
            try:
                row["text"].encode("utf-8")
            except UnicodeEncodeError as exc:  # a JSON escape like "\ud800" decodes to one
                raise InputError(f"{path}:{number}: 'text' is not valid Unicode (lone surrogate "
                                 f"{ascii(row['text'][exc.start])} at character {exc.start}); "
                                 "fix that line") from exc
            texts.append(row["text"])
        return texts
    return [line for line in content.splitlines() if line.strip()]


def make_embedder(args: argparse.Namespace) -> Any:
    from .device import Embedder

    return Embedder(args.artifacts, backend=args.backend, precision=args.precision,
                    num_threads=args.threads, device=args.device,
                    verify_files=not getattr(args, "no_verify", False))


def _run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .atomic_files import atomic_write_npy
    from .reporting import check_output_file

    texts = read_texts(args.input)
    if not texts:
        raise InputError(f"{args.input}: no texts")
    check_output_file(args.output, "--output", ".npy")
    emb = make_embedder(args)
    prompt_name = None if args.prompt == "none" else args.prompt
    from tqdm.auto import tqdm

    chunks = []
    step = 64
    for start in tqdm(range(0, len(texts), step), desc="embedding", unit="batch"):
        batch = texts[start:start + step]
        if prompt_name == "document":
            chunks.append(emb.encode_document(batch, dim=args.dim))
        else:
            chunks.append(emb.encode(batch, prompt_name=prompt_name, dim=args.dim))
    try:
        atomic_write_npy(args.output, np.concatenate(chunks))
    except OSError as exc:
        raise InputError(f"{args.output}: cannot write it ({exc.strerror or exc})") from exc
    print(f"wrote {args.output}: {len(texts)} x {chunks[0].shape[1]} float32 "
          f"({emb.backend}, {emb.graph_role})")
    return 0


# -- demo ----------------------------------------------------------------------------------
def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="offline end-to-end run on a tiny random model")
    p.add_argument("--workdir", type=Path, default=Path("build/demo"))
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .export.demo import run_demo

    return run_demo(args.workdir)


SUBCOMMANDS: list[Callable[[Any], None]] = [_add_export, _add_embed, _add_demo]


def _optional_subcommands() -> list[Callable[[Any], None]]:
    """Subcommands from other modules; each module exposes ``register(subparsers)``."""
    import importlib

    found = []
    # (the research tools are not here: `python -m research` from a checkout)
    for module in ("gemma_edge.export.evaluate", "gemma_edge.export.calibration",
                   "gemma_edge.compile.cli",
                   "gemma_edge.device.bench", "gemma_edge.device.apps",
                   "gemma_edge.device.serve_cli"):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' own output (TensorFlow, LiteRT, torch, JAX, "
                             "transformers logs and progress) and debug logging; without it "
                             "it is kept aside and printed only when the command fails. Also "
                             "accepted after the subcommand")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS + _optional_subcommands():
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .quiet import library_output

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and set(extra) <= {"--verbose"}:  # `gemma-edge demo --verbose` works too
        args.verbose = True
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # the console script (argv None) keeps native output captured through the shutdown
    with library_output(args.verbose, until_exit=argv is None) as captured:
        try:
            return int(args.func(args) or 0)
        except GemmaEdgeError as exc:
            captured.replay_errors()  # an error line of a library may explain it
            print(f"gemma-edge {args.command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
