"""Every way a checkpoint can be broken gets its own clear error."""

from __future__ import annotations

import json
import re
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


def _poison(path, value, name=None):
    """Rewrite one tensor of a safetensors file with ``value`` at one element."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith(name)) if name else sorted(tensors)[
        len(tensors) // 2]
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(path))
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_encoder_weights_are_refused(copy, value):
    weights = copy / "model.safetensors"
    name = _poison(weights, value)
    ck = load_checkpoint(copy)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: tensor '{name}' holds 1 non-finite")):
        ck.state_dict()


def test_non_finite_dense_weights_are_refused(copy):
    weights = copy / "3_Dense" / "model.safetensors"
    _poison(weights, float("-inf"), "linear.weight")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{weights}: tensor 'linear.weight' holds 1 non-finite")):
        load_checkpoint(copy)


def test_nan_checkpoint_export_fails_before_writing(copy, tmp_path, capsys):
    from gemma_edge.cli import main

    weights = copy / "model.safetensors"
    _poison(weights, float("nan"), "embed_tokens.weight")
    out = tmp_path / "art"
    code = main(["export", "--checkpoint", str(copy), "--out", str(out), "--no-quantize",
                 "--seq-len", "16", "--pool-slots", "2", "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "embed_tokens.weight" in err and "non-finite" in err
    assert not out.exists()
