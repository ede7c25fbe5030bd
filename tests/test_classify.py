"""k-NN intent classification: example files, voting, the .npz cache, the CLI."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from gemma_edge.cli import main
from gemma_edge.device.classify import (
    Classifier,
    Example,
    cache_path,
    classification_prompt,
    load_examples,
)
from gemma_edge.errors import InputError

EXAMPLES = [
    {"text": "turn on the kitchen lights", "label": "lights"},
    {"text": "switch the lights off", "label": "lights"},
    {"text": "dim the bedroom lights", "label": "lights"},
    {"text": "what is the weather tomorrow", "label": "weather"},
    {"text": "will it rain today", "label": "weather"},
    {"text": "play some jazz music", "label": "music"},
]


class BagEmbedder:
    """Hashed bag of words (prompt words ignored); records prompts and embedded texts."""

    output_dim = 64
    mrl_dims = [64, 32]
    artifact_id = "c1a5c1a5c1a5c1a5"

    def __init__(self, prompts=None):
        self.prompts = prompts if prompts is not None else {
            "query": "task: search result | query: ", "Classification": "task: classification"}
        self.seen: list[tuple[str, str]] = []

    def encode(self, texts, prompt_name=None, prompt=None, dim=None):
        self.seen.extend((prompt_name, t) for t in texts)
        out = np.full((len(texts), self.output_dim), 1e-3)
        for row, text in zip(out, texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                row[zlib.crc32(word.encode()) % self.output_dim] += 1.0
        out = out[:, :dim or self.output_dim]
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    @staticmethod
    def similarity(a, b):
        return np.atleast_2d(a) @ np.atleast_2d(b).T


@pytest.fixture()
def examples_file(tmp_path: Path) -> Path:
    path = tmp_path / "intents.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def test_knn_vote_picks_the_nearest_intent(examples_file: Path) -> None:
    embedder = BagEmbedder()
    clf = Classifier(embedder, load_examples(examples_file), k=3)
    first, second = clf.predict(["please turn the lights on", "is rain expected tomorrow"])
    assert (first.label, second.label) == ("lights", "weather")
    assert set(first.scores) == {"lights", "weather", "music"}
    assert abs(sum(first.scores.values()) - 1.0) < 1e-9
    assert first.confidence == first.scores["lights"] > 0.5
    assert first.neighbours[0]["label"] == "lights"
    assert first.best_similarity["lights"] > first.best_similarity["music"]
    assert {p for p, _ in embedder.seen} == {"Classification"}
    assert json.loads(json.dumps(first.to_dict()))["label"] == "lights"


def test_query_prompt_when_the_model_has_no_classification_prompt() -> None:
    assert classification_prompt({"query": "q", "document": "d"}) == "query"
    assert classification_prompt({"classification": "c"}) == "classification"
    embedder = BagEmbedder(prompts={"query": "q: "})
    Classifier(embedder, [Example("a b", "x"), Example("c d", "y")]).predict(["a"])
    assert {p for p, _ in embedder.seen} == {"query"}


def test_example_cache_is_reused_and_invalidated(examples_file: Path) -> None:
    first = BagEmbedder()
    Classifier(first, load_examples(examples_file), dim=32, examples_path=examples_file)
    cache = cache_path(examples_file, first.artifact_id, 32)
    assert cache.is_file() and cache.name == "intents.jsonl.c1a5c1a5c1a5c1a5.d32.npz"
    second = BagEmbedder()
    clf = Classifier(second, load_examples(examples_file), dim=32, examples_path=examples_file)
    assert second.seen == [] and clf.vectors.shape == (6, 32)  # all from the cache
    with examples_file.open("a") as handle:
        handle.write(json.dumps({"text": "next song please", "label": "music"}) + "\n")
    third = BagEmbedder()
    Classifier(third, load_examples(examples_file), dim=32, examples_path=examples_file)
    assert len(third.seen) == 7  # the examples changed: re-embedded
    cache.write_bytes(b"garbage")
    fourth = BagEmbedder()
    Classifier(fourth, load_examples(examples_file), dim=32, examples_path=examples_file)
    assert len(fourth.seen) == 7


def test_csv_examples_and_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "ex.csv"
    good.write_text("label,text\nlights,turn on the lights\nweather,\"rain, or sun?\"\n\n")
    assert load_examples(good) == [Example("turn on the lights", "lights"),
                                   Example("rain, or sun?", "weather")]
    cases = {
        "nohead.csv": ("lights,turn on\n", "header with 'text' and 'label'"),
        "empty.jsonl": ("\n\n", "no examples"),
        "bad.jsonl": ('{"text": "x", "label": "a"}\nnot json\n', "bad.jsonl:2: not JSON"),
        "nolabel.jsonl": ('{"text": "x"}\n', "nolabel.jsonl:1: missing or empty 'label'"),
        "ex.txt": ("x\n", "use .jsonl or .csv"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(InputError, match=re.escape(message)):
            load_examples(tmp_path / name)
    with pytest.raises(InputError, match="no such examples file"):
        load_examples(tmp_path / "missing.jsonl")


def test_bad_arguments() -> None:
    examples = [Example("a", "x")]
    with pytest.raises(InputError, match="at least one neighbour"):
        Classifier(BagEmbedder(), examples, k=0)
    with pytest.raises(InputError, match="Matryoshka dims are 64, 32"):
        Classifier(BagEmbedder(), examples, dim=100)
    with pytest.raises(InputError, match="text 2 is empty"):
        Classifier(BagEmbedder(), examples).predict(["ok", " "])


def test_cli_with_fake_embedder(examples_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("gemma_edge.cli.make_embedder", lambda args: BagEmbedder())
    inputs = tmp_path / "in.txt"
    inputs.write_text("play jazz\n\n")
    base = ["classify", "--artifacts", "x", "--examples", str(examples_file)]
    assert main(base + ["lights off please", "--input", str(inputs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in result] == ["lights", "music"]
    assert main(base + ["lights off please"]) == 0
    assert capsys.readouterr().out.startswith("lights\t")
    assert main(base) == 2
    assert "nothing to classify" in capsys.readouterr().err
    assert main(["classify", "--artifacts", "x", "--examples", str(tmp_path / "no.csv"),
                 "hi"]) == 2
    assert "no such examples file" in capsys.readouterr().err


def test_cli_end_to_end_with_tiny_model(tiny_artifacts: Path, examples_file: Path,
                                        capsys) -> None:
    args = ["classify", "--artifacts", str(tiny_artifacts), "--backend", "cpu",
            "--examples", str(examples_file), "--json", "-k", "3"]
    assert main(args + ["turn on the kitchen lights", "play some jazz music"]) == 0
    result = json.loads(capsys.readouterr().out)
    # an example's own text is its nearest neighbour (similarity 1), whatever the random model
    assert [r["neighbours"][0]["label"] for r in result] == ["lights", "music"]
    assert result[0]["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert sorted(result[0]["scores"]) == ["lights", "music", "weather"]
    caches = list(examples_file.parent.glob("intents.jsonl.*.d256.npz"))
    assert len(caches) == 1
    written = caches[0].stat().st_mtime_ns
    assert main(args + ["will it rain today"]) == 0  # second run reads the cache
    assert json.loads(capsys.readouterr().out)[0]["neighbours"][0]["label"] == "weather"
    assert caches[0].stat().st_mtime_ns == written
