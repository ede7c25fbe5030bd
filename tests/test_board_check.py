"""scripts/board_check.py without emulation: recipe keys, the cache, argument checks.

The emulated run itself is `make board-check` (and a CI step); these tests cover the
logic that decides what gets rebuilt and what is refused, plus the deploy script's
local method the board check uses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import board_check as bc  # noqa: E402

from gemma_edge.errors import GemmaEdgeError, InputError  # noqa: E402


def test_recipe_key_ignores_key_order_and_follows_content():
    part = {"debian": {"suite": "bookworm", "packages": ["python3", "libstdc++6"]}, "version": 1}
    reordered = {"version": 1, "debian": {"packages": ["python3", "libstdc++6"], "suite": "bookworm"}}
    assert bc.recipe_key(part) == bc.recipe_key(reordered)
    assert len(bc.recipe_key(part)) == 16
    changed = {"version": 1, "debian": {"suite": "bookworm", "packages": ["python3"]}}
    assert bc.recipe_key(changed) != bc.recipe_key(part)


def test_rootfs_key_does_not_depend_on_the_wheels_but_the_sites_do():
    recipe = bc.make_recipe(ROOT / "pyproject.toml")
    other = json.loads(json.dumps(recipe))
    other["requirements"].append("extra-package>=1")
    assert bc.recipe_key(bc.rootfs_part(recipe)) == bc.recipe_key(bc.rootfs_part(other))
    assert (bc.recipe_key(bc.site_part(recipe, "ai-edge-litert"))
            != bc.recipe_key(bc.site_part(other, "ai-edge-litert")))
    assert (bc.recipe_key(bc.site_part(recipe, "ai-edge-litert"))
            != bc.recipe_key(bc.site_part(recipe, "tflite-runtime")))
    other["debian"] = dict(other["debian"], suite="trixie")
    assert bc.recipe_key(bc.rootfs_part(recipe)) != bc.recipe_key(bc.rootfs_part(other))


def test_device_requirements_come_from_pyproject(tmp_path: Path):
    reqs = bc.device_requirements(ROOT / "pyproject.toml")
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in reqs["requirements"]}
    assert {"numpy", "sentencepiece", "tokenizers", "tqdm"} <= names
    assert not names & {"torch", "transformers", "tensorflow"}
    assert reqs["runtimes"]["ai-edge-litert"][0].startswith("ai-edge-litert")
    assert reqs["runtimes"]["tflite-runtime"] == ["tflite-runtime", "numpy<2"]
    broken = tmp_path / "pyproject.toml"
    broken.write_text("[tool.x]\n", encoding="utf-8")
    with pytest.raises(InputError, match="cannot read"):
        bc.device_requirements(broken)


def test_platform_tags_cover_every_manylinux_up_to_the_glibc():
    tags = bc.platform_tags("2.36", "aarch64")
    assert tags[0] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux_2_34_aarch64" in tags
    assert tags[-1] == "manylinux_2_36_aarch64" and "manylinux_2_37_aarch64" not in tags
    assert len(tags) == 1 + (36 - 17 + 1)
    with pytest.raises(InputError, match="2.17 or newer"):
        bc.platform_tags("2.5", "aarch64")


def test_cache_builds_once_rebuilds_on_a_new_recipe_and_keeps_foreign_folders(tmp_path: Path):
    builds = []

    def build(target: Path) -> None:
        builds.append(target.name)
        target.mkdir()
        (target / "payload").write_text("x", encoding="utf-8")

    foreign = tmp_path / "rootfs-someone-elses"
    foreign.mkdir()
    first = bc.cached(tmp_path, "rootfs", {"packages": ["python3"]}, build)
    assert bc.cached(tmp_path, "rootfs", {"packages": ["python3"]}, build) == first
    assert len(builds) == 1 and (first / "payload").is_file()
    second = bc.cached(tmp_path, "rootfs", {"packages": ["python3", "bash"]}, build)
    assert second != first and len(builds) == 2
    assert not first.exists(), "the stale build this script made must go"
    assert foreign.is_dir(), "a folder without the stamp is not ours: keep it"
    assert not list(tmp_path.glob("*.partial"))


def test_an_interrupted_build_is_not_taken_for_a_finished_one(tmp_path: Path):
    def failing(target: Path) -> None:
        target.mkdir()
        raise GemmaEdgeError("mirror unreachable")

    with pytest.raises(GemmaEdgeError):
        bc.cached(tmp_path, "rootfs", {"a": 1}, failing)
    assert not (tmp_path / f"rootfs-{bc.recipe_key({'a': 1})}").exists()
    built = bc.cached(tmp_path, "rootfs", {"a": 1}, lambda t: t.mkdir())
    assert (built / bc.STAMP).is_file() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("argv, message", [
    (["--runtimes", "tflite"], "--runtimes 'tflite': choose from ai-edge-litert, tflite-runtime"),
    (["--precisions", "fp16"], "--precisions 'fp16': choose from float, int8, full-int8"),
    (["--cpu", "cortex-a9"], None),
    (["--runtimes", ","], "--runtimes ',': choose from"),
    (["--min-cosine", "0"], "--min-cosine 0.0: a cosine in (0, 1]"),
])
def test_bad_arguments_get_one_line_errors(argv, message, capsys):
    if message is None:  # argparse's own choice check: usage and exit 2
        with pytest.raises(SystemExit) as exc:
            bc.main(argv)
        assert exc.value.code == 2 and "invalid choice: 'cortex-a9'" in capsys.readouterr().err
        return
    assert bc.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("board-check: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_artifacts_without_a_manifest_are_refused(tmp_path: Path, capsys):
    assert bc.main(["--artifacts", str(tmp_path)]) == 2
    assert "no manifest.json there" in capsys.readouterr().err


def test_quick_is_the_emulation_safe_subset_unless_told_otherwise():
    full, quick = bc.parse_args([]), bc.parse_args(["--quick"])
    assert full.runtimes == list(bc.RUNTIMES) and full.precisions == list(bc.PRECISIONS)
    # every graph, the int8 one included (issue 24: tflite-runtime computed it as zeros)
    assert quick.runtimes == ["tflite-runtime"]
    assert quick.precisions == ["float", "int8", "full-int8"]
    assert bc.parse_args(["--quick", "--precisions", "int8"]).precisions == ["int8"]


def test_arguments_deduplicate_and_keep_order():
    args = bc.parse_args(["--runtimes", "tflite-runtime,ai-edge-litert,tflite-runtime",
                          "--precisions", "full-int8"])
    assert args.runtimes == ["tflite-runtime", "ai-edge-litert"]
    assert args.precisions == ["full-int8"]


def test_missing_host_tools_name_the_apt_packages(monkeypatch):
    monkeypatch.setattr(bc.shutil, "which", lambda tool: None if tool == "mmdebstrap" else "/x")
    with pytest.raises(InputError, match="mmdebstrap not found: .*apt-get install -y qemu-user-static"):
        bc.check_host_tools()


def test_cosine_verdict_fails_on_nan_and_below_the_bound():
    import numpy as np

    a = np.array([[1.0, 0.0], [0.6, 0.8]])
    assert bc.verdict(bc.cosines(a, a), 0.999) == (pytest.approx(1.0), True)
    tilted = np.array([[1.0, 0.1], [0.6, 0.8]])
    low, ok = bc.verdict(bc.cosines(a, tilted), 0.999)
    assert not ok and low == pytest.approx(1 / math.sqrt(1.01))
    nan = np.array([[np.nan, 0.0], [0.6, 0.8]])
    low, ok = bc.verdict(bc.cosines(a, nan), 0.5)
    assert not ok and math.isnan(low)
    assert bc.verdict([], 0.5)[1] is False
    with pytest.raises(GemmaEdgeError, match="shapes differ"):
        bc.cosines(a, a[:1])


def test_wrappers_hand_the_userland_programs_to_qemu(tmp_path: Path):
    root, qemu = tmp_path / "root", tmp_path / "qemu-aarch64-static"
    bc.write_wrappers(tmp_path / "bin", str(qemu), root, [tmp_path / "project", tmp_path / "site"])
    python = (tmp_path / "bin" / "python3").read_text(encoding="utf-8")
    wrapper = tmp_path / "bin" / "python3"
    assert f'exec "{qemu}" -cpu cortex-a72 -L "{root}" -0 "{wrapper}" "{root}/usr/bin/python3"' in python
    assert f'PYTHONPATH="{tmp_path / "project"}:{tmp_path / "site"}"' in python
    assert "-m gemma_edge.cli" in (tmp_path / "bin" / "gemma-edge").read_text(encoding="utf-8")
    for name in ("python3", "gemma-edge", "uname"):
        path = tmp_path / "bin" / name
        assert os.access(path, os.X_OK)
        subprocess.run(["bash", "-n", str(path)], check=True)
    # the wrapper really execs qemu with the userland's program and the arguments
    qemu.write_text('#!/usr/bin/env bash\necho "$@"\n', encoding="utf-8")
    qemu.chmod(0o755)
    out = subprocess.run([str(tmp_path / "bin" / "uname"), "-m"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["-cpu", "cortex-a72", "-L", str(root), f"{root}/usr/bin/uname", "-m"]
    out = subprocess.run([str(wrapper), "-c", "pass"], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-4:] == [str(wrapper), f"{root}/usr/bin/python3", "-c", "pass"]


def _art(tmp_path: Path) -> Path:
    art = tmp_path / "art"
    (art / "sub").mkdir(parents=True)
    (art / "manifest.json").write_text("{}", encoding="utf-8")
    (art / "sub" / "graph.tflite").write_bytes(b"\0" * 1000)
    return art


def test_deploy_local_method_copies_into_home_and_verifies(tmp_path: Path):
    """The deploy script's `--method local`, which the board check uses instead of ssh."""
    art, home = _art(tmp_path), tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    script = str(ROOT / "scripts" / "deploy-to-board.sh")
    out = subprocess.run(["bash", script, "--method", "local", str(art)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "verified: 2 files, sizes match on the board" in out.stdout
    assert (home / "gemma-edge" / "art" / "sub" / "graph.tflite").stat().st_size == 1000
    refused = subprocess.run(["bash", script, "--method", "local", str(art), "pi@raspberrypi"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 1
    assert "--method local copies on this machine: drop pi@raspberrypi" in refused.stderr


def test_run_on_board_no_bench_embeds_and_skips_the_benchmark(tmp_path: Path):
    """run-on-board.sh --no-bench, which the board check runs (bench is too slow emulated)."""
    art = _art(tmp_path)
    calls = tmp_path / "calls"
    fake = tmp_path / "gemma-edge"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$1" >> "{calls}"
case $1 in
  --help|bench) exit 0 ;;
  embed) while (($#)); do [[ $1 == --output ]] && : > "$2"; shift; done ;;
esac
""", encoding="utf-8")
    fake.chmod(0o755)
    env = dict(os.environ, GEMMA_EDGE=str(fake), GEMMA_EDGE_APEX_DEVICE=str(tmp_path / "none"),
               PATH=f"{tmp_path}:/usr/bin:/bin")
    out_json = tmp_path / "out.json"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "run-on-board.sh"), "--no-bench",
                          "--backend", "cpu", str(art), str(out_json)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "--no-bench: writing the embed timing only" in out.stderr
    assert "bench" not in calls.read_text(encoding="utf-8").split()
    assert json.loads(out_json.read_text(encoding="utf-8"))["bench"] is None
