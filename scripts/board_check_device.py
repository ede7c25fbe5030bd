"""The device-side half of ``make board-check``: run by the board's Python (emulated arm64).

Also run natively on the workstation for the x86-64 reference vectors, so both sides
execute the same code. It must import only what a board has: the standard library,
numpy, a tokenizer, one TFLite runtime and gemma_edge (never torch, transformers or
tensorflow; checked here, in the process that ran the Embedder).

Usage: python3 board_check_device.py ARTIFACTS EDGETPU_ARTIFACTS OUT_DIR RUNTIME PRECISION...
Writes OUT_DIR/vectors-PRECISION.npy (query prompt) and prints one JSON report on stdout.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

HEAVY = ("torch", "transformers", "tensorflow")
# The texts both sides embed: short and long ones, several scripts, one past the
# tiny model's largest bucket (cut there on both sides).
TEXTS = [
    "How do I flash Mendel Linux onto the Coral Dev Board?",
    "The Edge TPU runs 8-bit integer graphs at a few watts.",
    "Matryoshka embeddings can be truncated to 256 or 128 dimensions.",
    "Wie schnell ist die Einbettung auf dem Board?",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "def embed(texts): return model.encode(texts, normalize=True)",
    " ".join(["Semantic search finds documents by meaning rather than by keywords."] * 12),
]
ELF_MACHINE = {62: "x86-64", 183: "aarch64", 40: "arm"}


def elf_machine(path: str) -> str:
    """The CPU an ELF shared object was built for (e_machine at byte 18, little endian).

    Why: a wheel of the wrong platform can sit in the site folder unnoticed if a
    pure-Python fallback exists; the extension modules' headers prove what runs.
    """
    with open(path, "rb") as handle:
        header = handle.read(20)
    if header[:4] != b"\x7fELF":
        return "not-elf"
    return ELF_MACHINE.get(int.from_bytes(header[18:20], "little"), "other")


def native_modules() -> dict[str, str]:
    """e_machine of every extension module this process loaded (numpy, tokenizers, runtime)."""
    found = {}
    for name, module in sorted(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if origin.endswith(".so"):
            found[name] = elf_machine(origin)
    return found


def edgetpu_error(artifacts: Path) -> str:
    """The message of asking for the Edge TPU backend where there is none ('' if it ran)."""
    from gemma_edge.device import Embedder
    from gemma_edge.errors import EdgeTpuUnavailableError

    try:
        Embedder(artifacts, backend="edgetpu", precision="int8")
    except EdgeTpuUnavailableError as exc:
        return str(exc)
    return ""


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    art, tpu_art, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    runtime, precisions = argv[3], argv[4:]
    import numpy as np

    from gemma_edge.device import Embedder
    from gemma_edge.device.runtime import interpreter_api

    _, _, found_runtime = interpreter_api()
    if found_runtime != runtime:
        print(f"board_check_device: error: expected runtime {runtime}, found {found_runtime}",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                              "libc": "-".join(platform.libc_ver()),
                              "runtime": found_runtime, "numpy": np.__version__, "embedder": {}}
    for precision in precisions:
        emb = Embedder(art, backend="cpu", precision=precision)
        vectors = emb.encode_query(TEXTS)
        np.save(out / f"vectors-{precision}.npy", vectors)
        report["embedder"][precision] = {"graph_role": emb.graph_role, "shape": list(vectors.shape),
                                         "finite": bool(np.isfinite(vectors).all())}
    report["edgetpu_error"] = edgetpu_error(tpu_art)
    report["native"] = native_modules()
    report["heavy_installed"] = [m for m in HEAVY if importlib.util.find_spec(m) is not None]
    report["heavy_imported"] = [m for m in HEAVY if m in sys.modules]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
