"""``make board-check``: the device side run as a 64-bit ARM board runs it, under qemu-user.

What it does (docs/board-check.md says what this proves and what it cannot):

1. builds an arm64 Debian userland from Debian's packages with ``mmdebstrap --variant=extract``
   (no maintainer scripts run, so no binfmt_misc is needed) and runs its Python as
   ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3``;
2. installs the device side the way a board user would, from aarch64 wheels only: the
   dependencies pyproject.toml declares plus one TFLite runtime (tflite-runtime or
   ai-edge-litert, one site folder each) and gemma-edge's own wheel;
3. exports the tiny model on this x86-64 machine, embeds the same texts here and under
   emulation with the CPU int8 and full-int8 graphs, compares the vectors (cosine), runs
   ``gemma-edge embed``/``search``/``classify`` and the Edge TPU error path there;
4. runs the hardware-free parts of the board scripts with that Python.

The userland and the wheel folders are cached under ``~/.cache/gemma-edge-board``
(``--cache-dir``), each keyed by a hash of its recipe: a changed recipe builds anew and
the stale folders this script made are removed. Emulated timings mean nothing: none is
reported as a latency.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
PROJECT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

from gemma_edge.errors import GemmaEdgeError, InputError  # noqa: E402

# Bump when a build step below changes what it produces for the same recipe.
RECIPE_VERSION = 2
DEBIAN = {
    "suite": "bookworm", "arch": "arm64", "mirror": "http://deb.debian.org/debian",
    "variant": "extract",
    # python3 (3.11 and its stdlib), the C++ runtime the wheels link against, and
    # coreutils for the ARM `uname` the board scripts ask for their machine.
    "packages": ["coreutils", "libstdc++6", "python3"],
}
PYTHON = {"version": "3.11", "abi": "cp311", "implementation": "cp",
          "glibc": "2.36", "arch": "aarch64"}  # bookworm's glibc: which manylinux wheels run
RUNTIMES = ("ai-edge-litert", "tflite-runtime")
# tflite-runtime 2.14 (its last release) is built against NumPy 1.x: with NumPy 2 its
# interpreter refuses to load a model, so the board scripts install it with numpy<2.
RUNTIME_FALLBACK_SPEC = {"tflite-runtime": ["tflite-runtime", "numpy<2"]}
# float is the control: its kernels are plain float on both CPUs.
PRECISIONS = ("float", "int8", "full-int8")
# The emulated CPU: the Raspberry Pi 4's Cortex-A72 (ARMv8.0: no LSE atomics, no dot
# product); cortex-a53 is the Coral Dev Board's and the Pi 3's, cortex-a76 the Pi 5's.
CPUS = ("cortex-a72", "cortex-a53", "cortex-a76", "max")
# The CI subset: tflite-runtime, the runtime whose kernels run under qemu (ai-edge-litert's
# aarch64 wheel needs ARMv8.1 atomics, docs/board-check.md), and every graph: the int8
# graph too since its FULLY_CONNECTED ops are written in a form tflite-runtime 2.14
# computes (export/hybrid_fc.py; before, zeros).
QUICK = {"runtimes": ("tflite-runtime",), "precisions": PRECISIONS}
STAMP = ".board-check-recipe.json"
TINY_EXPORT = {"buckets": [16, 32, 64], "pool_slots": 4, "edgetpu_buckets": [32]}


def note(text: str) -> None:
    print(f"board-check: {text}", flush=True)


# -- recipe and cache ------------------------------------------------------------------------
def device_requirements(pyproject: Path) -> dict[str, Any]:
    """The device side's dependencies and the runtime extra, as pyproject.toml declares them."""
    import tomllib

    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{pyproject}: cannot read [project] ({exc})") from exc
    extra = project.get("optional-dependencies", {}).get("runtime", [])
    litert = next((s for s in extra if s.replace("_", "-").startswith("ai-edge-litert")),
                  "ai-edge-litert")
    runtime = {"ai-edge-litert": [litert], **RUNTIME_FALLBACK_SPEC}
    return {"requirements": sorted(project.get("dependencies", [])), "runtimes": runtime}


def make_recipe(pyproject: Path) -> dict[str, Any]:
    return {"version": RECIPE_VERSION, "debian": DEBIAN, "python": PYTHON,
            **device_requirements(pyproject)}


def recipe_key(part: Any) -> str:
    """16 hex digits of the SHA-256 of a recipe part in canonical JSON (key order ignored)."""
    text = json.dumps(part, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def rootfs_part(recipe: dict[str, Any]) -> dict[str, Any]:
    return {"version": recipe["version"], "debian": recipe["debian"]}


def site_part(recipe: dict[str, Any], runtime: str) -> dict[str, Any]:
    """What one site folder depends on: the userland (its glibc) and the pinned specs."""
    return {**rootfs_part(recipe), "python": recipe["python"],
            "requirements": recipe["requirements"], "runtime": recipe["runtimes"][runtime]}


def platform_tags(glibc: str, arch: str) -> list[str]:
    """pip --platform tags a glibc accepts: manylinux2014 and every manylinux_2_N up to it.

    Why: pip takes the given tags literally (no implied older ones), and aarch64 wheels
    are tagged anywhere from manylinux2014 (2.17) to manylinux_2_34 (tflite-runtime 2.14).
    """
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise InputError(f"glibc {glibc}: expected 2.17 or newer")
    return [f"manylinux2014_{arch}"] + [f"manylinux_2_{n}_{arch}" for n in range(17, minor + 1)]


def cached(cache: Path, name: str, part: Any, build: Callable[[Path], None]) -> Path:
    """``cache/name-KEY``, built by ``build(tmp)`` if missing; stale ``name-*`` folders go.

    Built in a temporary folder renamed into place with the stamp written last, so an
    interrupted build is never mistaken for a finished one. Only folders holding this
    script's stamp are removed.
    """
    key = recipe_key(part)
    final = cache / f"{name}-{key}"
    stamp = json.dumps(part, sort_keys=True, indent=1)
    if (final / STAMP).is_file() and (final / STAMP).read_text(encoding="utf-8") == stamp:
        note(f"{name}: cached {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{name}-*"):
        ours = (old / STAMP).is_file() or old.name.endswith(".partial")
        if old != final and ours:
            shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # no valid stamp: an older, different build
        shutil.rmtree(final)
    tmp = cache / f"{name}-{key}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.monotonic()
    build(tmp)
    (tmp / STAMP).write_text(stamp, encoding="utf-8")
    tmp.rename(final)
    note(f"{name}: built {final} in {time.monotonic() - start:.0f} s")
    return final


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """A command that must succeed; its output is shown only when it fails."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if out.returncode:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        how = (f"was killed by {signal.Signals(-out.returncode).name}" if out.returncode < 0
               else f"failed with exit code {out.returncode}")
        raise GemmaEdgeError(f"`{' '.join(map(str, cmd[:4]))} ...` {how} (output above)")
    return out


# -- building ----------------------------------------------------------------------------------
def check_host_tools() -> str:
    """Path of qemu-aarch64-static; a one-line error naming the packages when a tool is missing."""
    missing = [tool for tool in ("qemu-aarch64-static", "mmdebstrap") if not shutil.which(tool)]
    if missing:
        raise InputError(f"{' and '.join(missing)} not found: install them with `sudo apt-get "
                         "install -y qemu-user-static mmdebstrap` (Debian/Ubuntu)")
    return str(shutil.which("qemu-aarch64-static"))


def build_rootfs(recipe: dict[str, Any], target: Path) -> None:
    deb = recipe["debian"]
    run(["mmdebstrap", "--quiet", f"--variant={deb['variant']}", f"--arch={deb['arch']}",
         "--include=" + ",".join(deb["packages"]), "--format=directory",
         deb["suite"], str(target), deb["mirror"]])
    # qemu's -L looks a path up in the userland first and falls back to this machine's:
    # the Python's site folders must exist in the userland so the host's stay unseen.
    for site in ("usr/local/lib/python3.11/dist-packages", "usr/lib/python3/dist-packages"):
        (target / site).mkdir(parents=True, exist_ok=True)


def pip_platform_args(recipe: dict[str, Any]) -> list[str]:
    py = recipe["python"]
    args = ["--only-binary=:all:", "--python-version", py["version"],
            "--implementation", py["implementation"], "--abi", py["abi"]]
    for tag in platform_tags(py["glibc"], py["arch"]):
        args += ["--platform", tag]
    return args


def build_site(recipe: dict[str, Any], runtime: str, target: Path) -> None:
    """The device side's aarch64 wheels and one runtime, pip-installed into a --target folder."""
    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-warn-conflicts", "--target", str(target), *pip_platform_args(recipe),
         *recipe["requirements"], *recipe["runtimes"][runtime]])


def build_project(work: Path) -> Path:
    """gemma-edge's own wheel (no dependencies) installed into ``work/project``."""
    dist, site = work / "dist", work / "project"
    for folder in (dist, site):
        shutil.rmtree(folder, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dist), str(PROJECT)])
    wheel = next(dist.glob("gemma_edge-*.whl"))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-warn-conflicts",
         "--target", str(site), str(wheel)])
    shutil.rmtree(site / "bin", ignore_errors=True)  # console script for this host's Python
    return wheel


def source_key() -> str:
    """Hash of the Python sources the export runs: re-export the tiny model when they change."""
    digest = hashlib.sha256(json.dumps(TINY_EXPORT, sort_keys=True).encode())
    for folder in ("gemma_edge", "export", "device", "compile"):
        for path in sorted((PROJECT / folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


EXPORT_CODE = """
import sys
from pathlib import Path
from gemma_edge.export.tiny import build_tiny_checkpoint
from gemma_edge.export.pipeline import ExportOptions, run_export
work, out = Path(sys.argv[1]), Path(sys.argv[2])
ckpt = build_tiny_checkpoint(work / "tiny-checkpoint")
run_export(str(ckpt), out, ExportOptions(buckets={buckets}, pool_slots={pool_slots},
           edgetpu_buckets={edgetpu_buckets}, evaluate=False))
"""


def export_tiny(work: Path) -> Path:
    """The tiny model's artifacts (float, int8, full-int8), exported here on x86-64."""
    key = source_key()
    art = work / f"artifacts-{key}"
    if (art / "manifest.json").is_file():
        note(f"tiny artifacts: cached {art}")
        return art
    for old in work.glob("artifacts-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = work / f"artifacts-{key}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.monotonic()
    run([sys.executable, "-c", EXPORT_CODE.format(**TINY_EXPORT), str(work), str(tmp)])
    tmp.rename(art)
    note(f"tiny artifacts: exported {art} in {time.monotonic() - start:.0f} s")
    return art


def with_compiled_entry(art: Path, target: Path) -> Path:
    """A copy of ``art`` whose manifest lists its full-int8 segments as Edge TPU-compiled.

    No edgetpu_compiler here: the files are the uncompiled segments under *_edgetpu names.
    Enough for the no-device path, which fails loading libedgetpu before reading a graph.
    """
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(art, target)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    source = next(g for g in manifest["graphs"] if g["role"] == "edgetpu")
    compiled = []
    for name in source["segments"]:
        renamed = name.replace(".tflite", "_edgetpu.tflite")
        shutil.copy(target / name, target / renamed)
        compiled.append(renamed)
        data = (target / renamed).read_bytes()  # listed like every exported file (verified)
        manifest.setdefault("files", {})[renamed] = {"sha256": hashlib.sha256(data).hexdigest(),
                                                     "bytes": len(data)}
    manifest["graphs"].append(dict(source, role="edgetpu-compiled", segments=compiled))
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return target


# -- the emulated board ----------------------------------------------------------------------------
def write_wrappers(bin_dir: Path, qemu: str, root: Path, sites: Sequence[Path],
                   cpu: str = CPUS[0]) -> None:
    """``python3``, ``gemma-edge`` and ``uname`` on PATH that run the userland's arm64 programs.

    Why wrappers: without binfmt_misc the kernel cannot start an arm64 program, so a
    script calls these, and each hands its program to qemu-user. The Python's argv[0]
    (qemu's -0) is the python3 wrapper, so its sys.executable is too and the child
    processes it starts (gemma-edge bench runs one per precision) are emulated as well.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = ":".join(str(s) for s in sites)
    emulator = f'exec "{qemu}" -cpu {cpu} -L "{root}"'
    python = f'{emulator} -0 "{bin_dir / "python3"}" "{root}/usr/bin/python3"'
    scripts = {
        "python3": f'PYTHONPATH="{pythonpath}" {python} "$@"',
        "gemma-edge": f'PYTHONPATH="{pythonpath}" {python} -m gemma_edge.cli "$@"',
        "uname": f'{emulator} "{root}/usr/bin/uname" "$@"',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n# arm64 {name} of {root} under qemu-user\n{body}\n",
                        encoding="utf-8")
        path.chmod(0o755)


def board_env(bin_dir: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(var, None)
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(home), GEMMA_EDGE_CACHE_DIR=str(home / "cache"),
               PYTHONDONTWRITEBYTECODE="1", TQDM_DISABLE="1")
    return env


def cosines(a: Any, b: Any) -> list[float]:
    """Row-wise cosine of two [N, D] matrices; NaN where a row is not finite."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise GemmaEdgeError(f"vector shapes differ: {a.shape} vs {b.shape}")
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(c) for c in num / den]


def verdict(values: Sequence[float], minimum: float) -> tuple[float, bool]:
    """(the smallest cosine, whether all pass); NaN never passes."""
    import math

    low = min(values) if values else float("nan")
    ok = bool(values) and all(not math.isnan(v) and v >= minimum for v in values)
    return (low if not any(math.isnan(v) for v in values) else float("nan")), ok


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="board-check", description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("GEMMA_EDGE_BOARD_CACHE",
                                               Path.home() / ".cache/gemma-edge-board")),
                   help="where the userland and wheel folders are kept between runs")
    p.add_argument("--workdir", type=Path, default=PROJECT / "build/board-check",
                   help="artifacts, vectors and the report (board-check.json)")
    p.add_argument("--runtimes", default=None,
                   help="comma list of " + ", ".join(RUNTIMES) + " (default: all; --quick: "
                        + ",".join(QUICK["runtimes"]) + ")")
    p.add_argument("--precisions", default=None,
                   help="comma list of " + ", ".join(PRECISIONS) + " (default: all; --quick: "
                        + ",".join(QUICK["precisions"]) + ")")
    p.add_argument("--cpu", default=CPUS[0], choices=CPUS,
                   help="CPU qemu emulates (default cortex-a72, a Raspberry Pi 4)")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="check these exported artifacts instead of exporting the tiny model")
    p.add_argument("--quick", action="store_true",
                   help="CI subset: the runtime and graphs that run correctly under emulation "
                        "(docs/board-check.md), the apps and the board scripts")
    p.add_argument("--min-cosine", type=float, default=0.999,
                   help="smallest cosine allowed between the arm64 and x86-64 vectors")
    args = p.parse_args(argv)
    full = {"runtimes": RUNTIMES, "precisions": PRECISIONS}
    for name, allowed in full.items():
        given = getattr(args, name)
        if given is None:
            given = ",".join(QUICK[name] if args.quick else allowed)
        setattr(args, name, split_choices(given, allowed, f"--{name}"))
    if args.artifacts is not None and not (args.artifacts / "manifest.json").is_file():
        raise InputError(f"--artifacts {args.artifacts}: no manifest.json there; pass a folder "
                         "`gemma-edge export` wrote")
    if not 0.0 < args.min_cosine <= 1.0:
        raise InputError(f"--min-cosine {args.min_cosine}: a cosine in (0, 1]")
    return args


def split_choices(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        raise InputError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(chosen))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        from board_check_run import run_check

        return run_check(args)
    except GemmaEdgeError as exc:
        print(f"board-check: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
