"""Bad export options get a one-line error before any work (issue 19), never a traceback
minutes later nor a silently ignored value."""

from __future__ import annotations

import json
import shutil

import pytest

from gemma_edge.cli import main
from gemma_edge.errors import InputError
from gemma_edge.export.pipeline import ExportOptions


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma_edge.export import pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("the export started building the encoder before refusing the options")

    monkeypatch.setattr(pipeline, "build_encoder", forbidden)


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "16,100000"], "--seq-len 100000: longer than the model's 2048 positions"),
    (["--seq-len", "2049"], "--seq-len 2049: longer than the model's 2048 positions"),
    (["--edgetpu-seq-len", "64,4096"],
     "--edgetpu-seq-len 4096: longer than the model's 2048 positions"),
    (["--pool-slots", "0"], "--pool-slots 0: must be at least 1"),
    (["--pool-slots", "-3"], "--pool-slots -3: must be at least 1"),
    (["--seq-len", "16,32", "--pool-slots", "33"], "--pool-slots 33: at most the largest bucket"),
    (["--seq-len", ","], "--seq-len: no bucket length given"),
    (["--edgetpu-seq-len", ","], "--edgetpu-seq-len: no bucket length given"),
])
def test_bad_export_options_are_refused_up_front(tiny_checkpoint, tmp_path, capsys, monkeypatch,
                                                 args, message):
    _no_conversion(monkeypatch)
    out = tmp_path / "art"
    code = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_position_limit_comes_from_the_checkpoint(tiny_checkpoint, tmp_path, capsys,
                                                      monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    _no_conversion(monkeypatch)
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art"),
                 "--seq-len", "16,128", "--no-edgetpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--seq-len 128: longer than the model's 64 positions" in err
    assert "max_position_embeddings" in err and str(ckpt / "config.json") in err


def test_buckets_at_the_position_limit_are_accepted():
    options = ExportOptions(buckets=(16, 2048), edgetpu_buckets=(2048,))
    options.validate(max_positions=2048)
    assert options.buckets == [16, 2048]


def test_edgetpu_buckets_are_not_checked_when_the_segments_are_not_built():
    ExportOptions(quantize=False, edgetpu_buckets=(4096,)).validate(max_positions=2048)
    ExportOptions(edgetpu=False, edgetpu_buckets=(4096,)).validate(max_positions=2048)
    with pytest.raises(InputError, match="--edgetpu-seq-len 4096"):
        ExportOptions(edgetpu_buckets=(4096,)).validate(max_positions=2048)


def test_force_is_explained_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--force" in text and "never a file" in text
