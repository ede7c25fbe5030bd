"""``make demo``: the whole pipeline offline on a tiny random Gemma3 built in code.

No download, no 1.2 GB checkpoint: a random EmbeddingGemma-shaped model with a
real tokenizer goes through export (float + int8, verified against
sentence-transformers), embedding, search and classification, the same code
paths as the real model. The vectors are random-model vectors: the point is to
see the machinery work, not meaningful neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = {
    "router.md": "# Router\nHold the reset button for ten seconds to restore factory settings.",
    "bread.txt": "Keep bread in a paper bag at room temperature; freeze slices for longer.",
    "train.md": "# Trains\nThe night train to Vienna leaves at 22:10 from platform 4.",
    "code.py": "def read_csv_in_chunks(path):\n    import pandas as pd\n"
               "    return pd.read_csv(path, chunksize=10000)\n",
}
EXAMPLES = [
    {"text": "turn on the lights", "label": "home"},
    {"text": "switch off the heating", "label": "home"},
    {"text": "what's the weather tomorrow", "label": "weather"},
    {"text": "will it rain in Paris", "label": "weather"},
]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(workdir: Path) -> int:
    from gemma_edge.cli import main as cli
    from gemma_edge.export.tiny import build_tiny_checkpoint

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _say("1. building a tiny random EmbeddingGemma-shaped checkpoint (offline)")
    ckpt = build_tiny_checkpoint(workdir / "checkpoint")
    art = workdir / "artifacts"
    _say("2. gemma-edge export: float + int8 TFLite graphs and the fully int8 Edge TPU "
         "segments, verified vs sentence-transformers")
    code = cli(["export", "--checkpoint", str(ckpt), "--out", str(art),
                "--seq-len", "16,32,64", "--pool-slots", "4", "--edgetpu-seq-len", "32"])
    if code:
        return code
    _say("3. gemma-edge embed: texts in a file -> .npy")
    texts = workdir / "texts.txt"
    texts.write_text("how do I reset my router\nwhen does the train to Vienna leave\n",
                     encoding="utf-8")
    for precision in ("float", "int8"):
        code = cli(["embed", "--artifacts", str(art), "--input", str(texts), "--output",
                    str(workdir / f"vectors-{precision}.npy"), "--backend", "cpu",
                    "--precision", precision, "--dim", "128"])
        if code:
            return code
    _say("4. gemma-edge search: index a folder, then query it")
    docs = workdir / "docs"
    docs.mkdir(exist_ok=True)
    for name, content in DOCS.items():
        (docs / name).write_text(content, encoding="utf-8")
    code = cli(["search", "index", str(docs), "--artifacts", str(art), "--backend", "cpu"])
    if code:
        return code
    code = cli(["search", "query", "factory reset", "--artifacts", str(art),
                "--db", str(docs / ".gemma-edge-search.sqlite"), "-k", "2", "--backend", "cpu"])
    if code:
        return code
    _say("5. gemma-edge classify: nearest labelled examples")
    examples = workdir / "intents.jsonl"
    examples.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n", encoding="utf-8")
    code = cli(["classify", "--artifacts", str(art), "--examples", str(examples),
                "--backend", "cpu", "dim the lights please"])
    if code:
        return code
    print(f"\ndemo finished; everything is in {workdir}. The model is random: "
          "run `make export CHECKPOINT=DIR` for the real EmbeddingGemma.")
    return 0
