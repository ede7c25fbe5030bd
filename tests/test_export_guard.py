"""``export --out``: only an artifacts folder (or an empty one) is replaced; nothing else is lost.

Issue 19: the export used to replace whatever ``--out`` named (the checkpoint folder, a
mistyped home folder, a file) and left the staging folders of killed exports behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_edge.cli import main
from gemma_edge.errors import InputError
from gemma_edge.manifest import MANIFEST_NAME, check_output_folder, staged_directory


def _fake_artifacts(folder: Path) -> None:
    """A folder as `gemma-edge export` leaves it (only the keys the guard reads)."""
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_text(json.dumps({"format_version": 1,
                                                    "gemma_edge_version": "0.1.0"}))
    (folder / "encoder_float.tflite").write_bytes(b"old graph")


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any work past the output check fail the test."""
    from gemma_edge.export import pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("the export started working before refusing --out")

    monkeypatch.setattr(pipeline, "load_checkpoint", forbidden)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_checkpoint_folder_as_out_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys,
                                                             monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "NOTES.txt").write_text("my notes")
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    _no_work(monkeypatch)
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt), "--no-quantize"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{ckpt}: holds the checkpoint being exported" in err and "even with --force" in err
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before
    assert (ckpt / "NOTES.txt").read_text() == "my notes"
    # --force never replaces the folder that holds the checkpoint being exported
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt), "--force"])
    assert code == 2 and "holds the checkpoint" in capsys.readouterr().err
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before


def test_folder_with_other_files_is_refused(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    _no_work(monkeypatch)
    code = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(work)])
    err = capsys.readouterr().err
    assert code == 2 and f"{work}: exists and is not a gemma-edge artifacts folder" in err
    assert "--force" in err
    assert (work / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no staging folder either


def test_a_foreign_or_broken_manifest_is_not_enough(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_NAME).write_text(json.dumps({"name": "some web app"}))
    with pytest.raises(InputError, match="not a gemma-edge artifacts folder"):
        check_output_folder(other)
    (other / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not a gemma-edge artifacts folder"):
        check_output_folder(other)


def test_file_as_out_is_refused_even_with_force(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    _no_work(monkeypatch)
    for extra in ([], ["--force"]):
        code = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(target), *extra])
        err = capsys.readouterr().err
        assert code == 2 and f"{target}: is a file" in err
        assert target.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_force_never_replaces_the_current_or_home_directory(tmp_path, monkeypatch):
    parent = tmp_path / "home"
    inner = parent / "project"
    inner.mkdir(parents=True)
    (inner / "keep.txt").write_text("x")
    monkeypatch.chdir(inner)
    for target in (inner, parent):
        with pytest.raises(InputError, match="current directory"):
            check_output_folder(target, force=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(parent))
    with pytest.raises(InputError, match="home directory"):
        check_output_folder(parent, force=True)
    assert (inner / "keep.txt").read_text() == "x"


def test_artifacts_or_empty_folders_are_replaced(tmp_path):
    art = tmp_path / "art"
    _fake_artifacts(art)
    with staged_directory(art) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in art.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_directory(empty) as stage:
        (stage / "new.txt").write_text("new")
    assert (empty / "new.txt").is_file()


def test_force_replaces_a_foreign_folder(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "old.txt").write_text("old")
    with pytest.raises(InputError, match="--force"):
        with staged_directory(other):
            raise AssertionError("must not start")
    with staged_directory(other, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in other.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_out_filled_during_the_export_is_kept_and_so_is_the_export(tmp_path):
    """The check runs again before the swap: a folder that stopped being replaceable
    meanwhile is left alone, and the finished export is kept where the message says."""
    out = tmp_path / "art"
    with pytest.raises(InputError, match="changed during the export") as info:
        with staged_directory(out) as stage:
            (stage / "graph.tflite").write_bytes(b"graph")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine"
    kept = [p for p in tmp_path.iterdir() if p.name != "art"]
    assert len(kept) == 1 and (kept[0] / "graph.tflite").is_file()
    assert str(kept[0]) in str(info.value)


def test_staging_folder_records_the_owner_pid(tmp_path):
    with staged_directory(tmp_path / "art") as stage:
        assert stage.name.startswith(f".art.staging-{os.getpid()}-")


def test_stale_staging_of_a_killed_export_is_removed_by_the_next(tmp_path):
    out = tmp_path / "art"
    script = ("import sys, time\n"
              "from gemma_edge.manifest import staged_directory\n"
              "with staged_directory(sys.argv[1]) as stage:\n"
              "    (stage / 'half.tflite').write_bytes(b'x' * 1000)\n"
              "    print(stage, flush=True)\n"
              "    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE,
                             text=True)
    try:
        stage = Path(child.stdout.readline().strip())
        assert stage.is_dir() and (stage / "half.tflite").is_file()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert stage.is_dir()  # SIGKILL: no clean-up ran
    with staged_directory(out) as new_stage:
        assert not stage.exists()
        (new_stage / "ok").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_only_dead_exports_own_staging_folders_are_removed(tmp_path, caplog):
    out = tmp_path / "art"
    dead = tmp_path / f".art.staging-{_dead_pid()}-abc_1234"
    live = tmp_path / f".art.staging-{os.getppid()}-abc_1234"
    legacy = tmp_path / ".art.staging-k2j4_x9q"  # before staging folders named their owner
    lookalikes = [tmp_path / ".art.staging-notes", tmp_path / f".other.staging-{_dead_pid()}-abcd1234",
                  tmp_path / f".art.staging-{_dead_pid()}-abcd1234.bak"]
    old_file = tmp_path / f".art.old-{_dead_pid()}"  # a file an older export renamed
    for folder in (dead, live, legacy, *lookalikes):
        folder.mkdir()
        (folder / "x").write_text("x")
    old_file.write_text("user data")
    link_target = tmp_path / "target"
    link_target.mkdir()
    (link_target / "x").write_text("x")
    link = tmp_path / f".art.staging-{_dead_pid()}-lnk_1234"
    link.symlink_to(link_target)
    with caplog.at_level(logging.INFO, logger="gemma_edge"):
        with staged_directory(out) as stage:
            (stage / "ok").write_text("ok")
    assert not dead.exists()
    for kept in (live, legacy, *lookalikes, link_target):
        assert (kept / "x").is_file(), kept
    assert link.is_symlink() and old_file.read_text() == "user data"
    assert f"removed {dead}" in caplog.text
    assert str(legacy) in caplog.text and str(old_file) in caplog.text  # reported, kept
