"""The edgetpu_compiler wrapper and `gemma-edge compile`, against a fake compiler on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.edgetpu.tflite_builder import complete_manifest, fc_model

from gemma_edge.cli import main
from gemma_edge.compile.compiler import Policy, compile_model
from gemma_edge.errors import CompilationError, CompilerNotFoundError, InputError
from gemma_edge.manifest import load_manifest

FAKE = Path(__file__).parent / "fixtures" / "edgetpu" / "fake_edgetpu_compiler.py"


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fake compiler first on PATH; returns the file its argv is logged to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "edgetpu_compiler"
    exe.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("GEMMA_EDGE_EDGETPU_COMPILER", raising=False)
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "ok")
    args = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_EDGETPU_ARGS", str(args))
    return args


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return fc_model(tmp_path / "encoder_edgetpu_16.tflite")


def test_success_writes_outputs_and_report(fake: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = compile_model(model, out, min_runtime=13, timeout=30)
    compiled = out / "encoder_edgetpu_16_edgetpu.tflite"
    assert result.models[0].outputs == [compiled] and compiled.stat().st_size == 8192
    assert result.models[0].logs == [out / "encoder_edgetpu_16_edgetpu.log"]
    argv = json.loads(fake.read_text())
    assert argv[:5] == ["--show_operations", "--out_dir", argv[2], "--timeout_sec", "30"]
    assert ["--min_runtime_version", "13"] == argv[5:7] and argv[-1] == str(model.resolve())
    report = json.loads(result.report_path.read_text())
    entry = report["models"][0]
    assert report["compiler"]["version"] == "16.0.384591198" and report["policy"]["passed"]
    assert (entry["tpu_ops"], entry["cpu_ops"], entry["edgetpu_subgraphs"]) == (1, 0, [1])
    assert entry["comparison"]["agrees"] and entry["prediction"]["tpu_ops"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "encoder_edgetpu_16_edgetpu.log", "encoder_edgetpu_16_edgetpu.report.json",
        "encoder_edgetpu_16_edgetpu.tflite"]  # the staging folder is gone


def test_segments_produce_every_segment(fake: Path, model: Path, tmp_path: Path) -> None:
    result = compile_model(model, tmp_path / "out", segments=2, timeout=30)
    assert [p.name for p in result.models[0].outputs] == [
        "encoder_edgetpu_16_segment_0_of_2_edgetpu.tflite",
        "encoder_edgetpu_16_segment_1_of_2_edgetpu.tflite"]
    assert ["--num_segments", "2"] == json.loads(fake.read_text())[5:7]
    assert [o["segment"] for o in result.report["models"][0]["outputs"]] == [[0, 2], [1, 2]]


def test_cocompilation_passes_all_models(fake: Path, model: Path, tmp_path: Path) -> None:
    other = fc_model(tmp_path / "encoder_edgetpu_32.tflite")
    result = compile_model(model, tmp_path / "out", extra_models=[other], timeout=30)
    assert json.loads(fake.read_text())[-2:] == [str(model.resolve()), str(other.resolve())]
    assert [m.outputs[0].name for m in result.models] == [
        "encoder_edgetpu_16_edgetpu.tflite", "encoder_edgetpu_32_edgetpu.tflite"]


def test_nonzero_exit_is_a_compilation_error(fake: Path, model: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "fail")
    out = tmp_path / "out"
    with pytest.raises(CompilationError, match="exit 1, internal_error.*Internal compiler"):
        compile_model(model, out, timeout=30)
    failed = json.loads((out / "encoder_edgetpu_16_edgetpu.failed.json").read_text())
    assert failed["returncode"] == 1 and "Aborting" in failed["console_text"]
    assert not list(out.glob("*.tflite"))


def test_model_not_quantized(fake: Path, model: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "notquantized")
    with pytest.raises(CompilationError, match="not_quantized.*full-int8 graph"):
        compile_model(model, tmp_path / "out", timeout=30)


@pytest.mark.parametrize("mode,message", [("stub", "only 1000 bytes, a stub"),
                                          ("nocustom", "has no edgetpu-custom-op")])
def test_bad_output_file_fails_despite_exit_0(fake: Path, model: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, mode: str,
                                              message: str) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", mode)
    with pytest.raises(CompilationError, match=message):
        compile_model(model, tmp_path / "out", timeout=30)
    assert not (tmp_path / "out" / "encoder_edgetpu_16_edgetpu.tflite").exists()


def test_timeout_kills_the_compiler(fake: Path, model: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "sleep")
    started = time.monotonic()
    with pytest.raises(CompilationError, match="still running after 2 s, killed"):
        compile_model(model, tmp_path / "out", timeout=1)
    assert time.monotonic() - started < 15
    assert not list((tmp_path / "out").iterdir())  # staging removed


def test_missing_compiler_names_both_routes(model: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GEMMA_EDGE_EDGETPU_COMPILER", raising=False)
    with pytest.raises(CompilerNotFoundError) as info:
        compile_model(model, tmp_path / "out")
    assert "scripts/install-edgetpu-compiler.sh" in str(info.value)
    assert "make compile-docker" in str(info.value)


def test_policy_max_cpu_ops_and_single_subgraph(fake: Path, model: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "partial")
    result = compile_model(model, tmp_path / "a", timeout=30)  # default policy: no CPU limit
    entry = result.report["models"][0]
    assert (entry["tpu_ops"], entry["cpu_ops"]) == (1, 3)
    assert entry["outputs"][0]["rows_source"] == "operation log"
    assert not entry["comparison"]["agrees"]  # the fake reports ops the model does not have
    with pytest.raises(CompilationError, match="3 ops run on the CPU, more than --max-cpu-ops 2"):
        compile_model(model, tmp_path / "b", timeout=30, policy=Policy(max_cpu_ops=2))
    monkeypatch.setenv("FAKE_SUBGRAPHS", "2")
    with pytest.raises(CompilationError, match="2 Edge TPU subgraphs"):
        compile_model(model, tmp_path / "c", timeout=30)


@pytest.mark.parametrize("kwargs,message", [({"segments": 1}, "2 or more"),
                                            ({"min_runtime": 15}, "runtime 10 to 14"),
                                            ({"timeout": 0}, "positive")])
def test_bad_options(fake: Path, model: Path, tmp_path: Path, kwargs: dict,
                     message: str) -> None:
    with pytest.raises(InputError, match=message):
        compile_model(model, tmp_path / "out", **kwargs)


def _artifacts(tmp_path: Path) -> Path:
    art = tmp_path / "art"
    art.mkdir()
    fc_model(art / "encoder_edgetpu_16.tflite")
    graph = {"path": "encoder_edgetpu_16.tflite", "role": "edgetpu", "seq_lens": [16],
             "signatures": {"16": "encode_16"}, "pool_slots": 4}
    manifest = complete_manifest(art, [graph], [16], ["encoder_edgetpu_16.tflite"])
    manifest["extra_key"] = "kept"
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


def test_cli_compiles_artifacts_and_updates_manifest(fake: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    art = _artifacts(tmp_path)
    assert main(["compile", str(art), "--timeout", "30"]) == 0
    manifest = load_manifest(art, verify_hashes=True)
    compiled = [g for g in manifest["graphs"] if g["role"] == "edgetpu-compiled"]
    assert len(compiled) == 1 and manifest["extra_key"] == "kept"
    entry = compiled[0]
    assert entry["path"] == "encoder_edgetpu_16_edgetpu.tflite" and entry["seq_lens"] == [16]
    assert entry["source"] == "encoder_edgetpu_16.tflite" and entry["pool_slots"] == 4
    assert entry["compile_report"] in manifest["files"] and entry["path"] in manifest["files"]
    assert "matches the pre-flight" in capsys.readouterr().out
    assert main(["compile", str(art), "--timeout", "30"]) == 0  # recompiling replaces the entry
    assert len([g for g in load_manifest(art)["graphs"] if g["role"] == "edgetpu-compiled"]) == 1


def test_cli_compile_failure_leaves_manifest_alone(fake: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    art = _artifacts(tmp_path)
    before = (art / "manifest.json").read_bytes()
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "fail")
    assert main(["compile", str(art), "--timeout", "30"]) == 2
    assert "gemma-edge compile: error:" in capsys.readouterr().err
    assert (art / "manifest.json").read_bytes() == before


def test_cli_module_imports_nothing_heavy() -> None:
    code = ("import sys, gemma_edge.compile.cli; "
            "print([m for m in ('numpy', 'ai_edge_litert', 'torch', 'tensorflow', "
            "'flatbuffers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_cli_co_compiles_the_segments_of_a_bucket(fake: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    art = tmp_path / "art"
    (art / "edgetpu").mkdir(parents=True)
    segments = [f"edgetpu/{kind}_16_00.tflite" for kind in ("attn", "mlp")]
    for name in segments:
        fc_model(art / name)
    (art / "edgetpu" / "host.npz").write_bytes(b"constants")
    graph = {"path": "edgetpu/host.npz", "role": "edgetpu", "layout": "segments",
             "segments": segments, "seq_lens": [16], "pool_slots": 4}
    (art / "manifest.json").write_text(json.dumps(
        complete_manifest(art, [graph], [16], segments + ["edgetpu/host.npz"])))
    argv_log = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_EDGETPU_ARGS", str(argv_log))
    assert main(["compile", str(art), "--timeout", "30"]) == 0
    argv = json.loads(argv_log.read_text())
    assert [a for a in argv if a.endswith(".tflite")] == [str(art / s) for s in segments]
    manifest = load_manifest(art, verify_hashes=True)
    entry = next(g for g in manifest["graphs"] if g["role"] == "edgetpu-compiled")
    assert entry["layout"] == "segments" and entry["path"] == "edgetpu/host.npz"
    assert entry["segments"] == ["edgetpu/attn_16_00_edgetpu.tflite",
                                 "edgetpu/mlp_16_00_edgetpu.tflite"]
    assert all(s in manifest["files"] for s in entry["segments"])
    assert main(["compile", str(art), "--timeout", "30", "--segments", "2"]) == 2


def test_relative_paths_resolve_before_the_compiler_starts(fake: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiler runs inside its staging folder: a relative --out_dir, model or compiler
    path given from the caller's folder would resolve against that folder instead."""
    work = tmp_path / "work"
    (work / "bin").mkdir(parents=True)
    fc_model(work / "encoder_edgetpu_16.tflite")
    exe = work / "bin" / "edgetpu_compiler"
    exe.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
    exe.chmod(0o755)
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", f"bin{os.pathsep}{os.environ['PATH']}")  # a relative PATH entry
    result = compile_model(Path("encoder_edgetpu_16.tflite"), Path("out"), timeout=30)
    assert result.models[0].outputs == [Path("out") / "encoder_edgetpu_16_edgetpu.tflite"]
    assert (work / "out" / "encoder_edgetpu_16_edgetpu.tflite").stat().st_size == 8192
    argv = json.loads(fake.read_text())
    out_dir = Path(argv[argv.index("--out_dir") + 1])
    assert out_dir.is_absolute() and out_dir.parent == work / "out"
    report = json.loads(result.report_path.read_text())
    assert Path(report["compiler"]["path"]) == exe  # absolute: found from the caller's folder
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("GEMMA_EDGE_EDGETPU_COMPILER", "bin/edgetpu_compiler")
    assert compile_model(Path("encoder_edgetpu_16.tflite"), Path("out2"), timeout=30).models


def test_cli_compiles_a_relative_artifacts_dir(fake: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """`make compile` passes build/artifacts: the segments live in build/artifacts/edgetpu."""
    art = tmp_path / "build" / "artifacts"
    (art / "edgetpu").mkdir(parents=True)
    segments = [f"edgetpu/{kind}_32_00.tflite" for kind in ("attn", "mlp")]
    for name in segments:
        fc_model(art / name)
    graph = {"path": "edgetpu/host.npz", "role": "edgetpu", "layout": "segments",
             "segments": segments, "seq_lens": [32], "pool_slots": 4}
    (art / "edgetpu" / "host.npz").write_bytes(b"constants")
    (art / "manifest.json").write_text(json.dumps(
        complete_manifest(art, [graph], [32], segments + ["edgetpu/host.npz"])))
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "build/artifacts", "--timeout", "30"]) == 0, capsys.readouterr().err
    manifest = load_manifest(art, verify_hashes=True)
    entry = next(g for g in manifest["graphs"] if g["role"] == "edgetpu-compiled")
    assert entry["segments"] == ["edgetpu/attn_32_00_edgetpu.tflite",
                                 "edgetpu/mlp_32_00_edgetpu.tflite"]
    assert entry["compile_report"] == "edgetpu/attn_32_00_edgetpu.report.json"
    assert (art / "edgetpu" / "attn_32_00_edgetpu.tflite").is_file()
    assert not list((art / "edgetpu").glob(".edgetpu-compile-*"))
