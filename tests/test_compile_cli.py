"""`gemma-edge check`: parser wiring, JSON and table output, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.edgetpu.tflite_builder import GraphBuilder, complete_manifest, fc_model

from gemma_edge.cli import build_parser, main


def test_subcommands_are_registered() -> None:
    args = build_parser().parse_args(["compile", "art", "--segments", "3", "--min-runtime",
                                      "13", "--max-cpu-ops", "0", "--timeout", "90"])
    assert (args.segments, args.min_runtime, args.max_cpu_ops, args.timeout) == (3, 13, 0, 90.0)
    args = build_parser().parse_args(["check", "m.tflite", "--target", "pcie", "--clock", "max"])
    assert (args.target, args.clock, args.json) == ("pcie", "max", False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["check", "m.tflite", "--target", "usb2"])


def test_check_json_selects_target_and_clock(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    model = fc_model(tmp_path / "fc.tflite")
    assert main(["check", str(model), "--json", "--target", "devboard", "--clock", "std"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (graph,) = doc["graphs"]
    assert graph["tpu_ops"] == 1 and graph["mac_share"] == 1.0
    assert [(e["target"], e["clock"]) for e in graph["estimates"]] == [("devboard", "std")]


def test_check_exits_1_when_the_compiler_would_refuse(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    b = GraphBuilder()
    x, y = b.tensor([1, 8]), b.tensor([1, 8])
    b.op("GELU", [x], [y])
    assert main(["check", str(b.save(tmp_path / "gelu.tflite", [x], [y]))]) == 1
    out = capsys.readouterr().out
    assert "WILL NOT COMPILE" in out and "'GELU' version '1'" in out


def test_check_artifacts_dir_reads_edgetpu_graphs(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    fc_model(tmp_path / "encoder_edgetpu_16.tflite")
    fc_model(tmp_path / "encoder_edgetpu_32.tflite", tokens=4)
    graphs = [{"path": f"encoder_edgetpu_{t}.tflite", "role": "edgetpu", "seq_lens": [t],
               "pool_slots": 4} for t in (16, 32)]
    names = [g["path"] for g in graphs]
    (tmp_path / "manifest.json").write_text(json.dumps(
        complete_manifest(tmp_path, graphs, [16, 32], names)))
    assert main(["check", str(tmp_path), "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["graphs"][0]["tpu_ops"] for d in docs] == [1, 0]


def test_check_missing_file_is_an_input_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(tmp_path / "nope.tflite")]) == 2
    assert "nope.tflite: no such file" in capsys.readouterr().err
