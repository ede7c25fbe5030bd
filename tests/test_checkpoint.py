"""Every way a checkpoint can be broken gets its own clear error."""

from __future__ import annotations

import json
import shutil

import pytest

from gemma_edge.errors import CheckpointError, HubUnreachableError
from gemma_edge.export.checkpoint import load_checkpoint


@pytest.fixture()
def copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_loads_tiny(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    assert ck.config["model_type"] == "gemma3_text"
    assert len(ck.dense) == 2 and ck.output_dim == 256
    assert ck.prompts["query"].startswith("task: search result")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "nope")


def test_file_instead_of_directory(copy):
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(copy / "config.json")


def test_not_gemma(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "bert"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        load_checkpoint(copy)


def test_causal_gemma_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["use_bidirectional_attention"] = False
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="causal"):
        load_checkpoint(copy)


def test_missing_dense(copy):
    shutil.rmtree(copy / "3_Dense")
    with pytest.raises(CheckpointError, match="3_Dense.*missing"):
        load_checkpoint(copy)


def test_no_dense_modules(copy):
    modules = json.loads((copy / "modules.json").read_text())
    modules = [m for m in modules if not m["type"].endswith("Dense")]
    (copy / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="no Dense modules"):
        load_checkpoint(copy)


def test_truncated_safetensors(copy):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_checkpoint(copy)


def test_garbage_safetensors(copy):
    (copy / "2_Dense" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="2_Dense/model.safetensors"):
        load_checkpoint(copy)


def test_hub_id_offline_explains_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="local directory"):
        load_checkpoint("google/embeddinggemma-300m")
