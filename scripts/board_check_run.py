"""The steps of ``make board-check`` in order (scripts/board_check.py builds the pieces).

Every check appends to one report; a failed check does not stop the others, so one
run shows everything that differs on the board. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import board_check as bc
from board_check_scripts import check_board_scripts

from gemma_edge.atomic_files import atomic_write_json

EDGETPU_MESSAGE = "no Edge TPU available"
# The apps run the exact float graph on both sides: their check is the plumbing (index,
# SQLite store, kNN vote), the graphs' numerics are the embed checks' job.
APPS_PRECISION = "float"
SEARCH_QUERY = "factory reset"
CLASSIFY_TEXTS = ["dim the lights please", "will it snow tomorrow"]


class Report:
    """Checks passed/failed, with the figures behind them."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        bc.note(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [c["check"] for c in self.checks if not c["ok"]]


def device_report(python: list[str], art: Path, tpu_art: Path, out: Path, runtime: str,
                  precisions: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [*python, str(bc.SCRIPTS / "board_check_device.py"), str(art), str(tpu_art), str(out),
           runtime, *precisions]
    return json.loads(bc.run(cmd, env=env).stdout.strip().splitlines()[-1])


def gemma_edge(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd))


def run_apps(ge: list[str], art: Path, work: Path, env: dict[str, str],
             no_vec: bool) -> dict[str, Any]:
    """`gemma-edge search index/query` and `classify` end to end; their JSON answers."""
    from gemma_edge.export.demo import DOCS, EXAMPLES

    docs = work / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name, content in DOCS.items():
        (docs / name).write_text(content, encoding="utf-8")
    examples = work / "intents.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES), encoding="utf-8")
    vec = ["--no-vec"] if no_vec else []
    db = docs / ".gemma-edge-search.sqlite"
    steps = {
        "index": [*ge, "search", "index", str(docs), "--artifacts", str(art), "--rebuild", *vec],
        "query": [*ge, "search", "query", SEARCH_QUERY, "--artifacts", str(art), "--db", str(db),
                  "-k", "3", "--json", *vec],
        "classify": [*ge, "classify", "--artifacts", str(art), "--examples", str(examples),
                     "--json", "--no-cache", *CLASSIFY_TEXTS],
    }
    answers: dict[str, Any] = {}
    for name, cmd in steps.items():
        out = gemma_edge([*cmd, "--backend", "cpu", "--precision", APPS_PRECISION], env, work)
        if out.returncode:
            raise bc.GemmaEdgeError(f"gemma-edge {name} failed ({out.returncode}): "
                                    f"{out.stderr.strip()[-600:]}")
        answers[name] = json.loads(out.stdout) if name != "index" else out.stdout.strip()
    return {"hits": [h["path"] for h in answers["query"]["hits"]],
            "scores": [h["score"] for h in answers["query"]["hits"]],
            "labels": [p["label"] for p in answers["classify"]]}


def compare_vectors(report: Report, name: str, arm: Path, x86: Path, minimum: float) -> float:
    import numpy as np

    if not arm.is_file():
        report.check(name, False, f"{arm} was not written")
        return float("nan")
    low, ok = bc.verdict(bc.cosines(np.load(arm), np.load(x86)), minimum)
    report.check(name, ok, f"min cosine {low:.6f} over the texts (need >= {minimum})")
    return low


def check_runtime(args: argparse.Namespace, report: Report, runtime: str, ctx: dict[str, Any],
                  with_apps: bool, with_scripts: bool) -> dict[str, Any]:
    """Every emulated check for one runtime; returns its figures for the summary."""
    work: Path = args.workdir
    bin_dir, home = work / f"bin-{runtime}", work / f"home-{runtime}"
    tag = f"[{runtime}]"
    bc.write_wrappers(bin_dir, ctx["qemu"], ctx["root"], [work / "project", ctx["sites"][runtime]],
                      args.cpu)
    env = bc.board_env(bin_dir, home)
    if with_scripts:
        for name, ok, detail in check_board_scripts(bin_dir, env, ctx["art"], work, ctx["wheel"],
                                                     ctx["tpu_art"]):
            report.check(f"{tag} {name}", ok, detail)
    out = work / f"arm64-{runtime}"
    dev = device_report([str(bin_dir / "python3")], ctx["art"], ctx["tpu_art"], out, runtime,
                        args.precisions, env)
    glibc = "glibc-" + args.recipe["python"]["glibc"]
    report.check(f"{tag} arm64 Python", dev["machine"] == "aarch64" and dev["libc"] == glibc,
                 f"{dev['machine']}, Python {dev['python']}, {dev['libc']} (recipe {glibc}), "
                 f"numpy {dev['numpy']}")
    native = dev["native"]
    report.check(f"{tag} native modules are aarch64",
                 bool(native) and set(native.values()) == {"aarch64"}
                 and any(n.startswith("numpy.") for n in native),
                 f"{len(native)} extension modules: {sorted(set(native.values()))}")
    report.check(f"{tag} no torch/transformers/tensorflow",
                 not dev["heavy_installed"] and not dev["heavy_imported"],
                 f"installed {dev['heavy_installed']}, imported {dev['heavy_imported']}")
    report.check(f"{tag} Edge TPU asked for without a device",
                 dev["edgetpu_error"].startswith(EDGETPU_MESSAGE), dev["edgetpu_error"][:160])
    figures: dict[str, Any] = {"device": dev, "cosine": {}}
    ge = [str(bin_dir / "gemma-edge")]
    texts = work / "texts.txt"
    for precision in args.precisions:
        figures["cosine"][f"Embedder {precision}"] = compare_vectors(
            report, f"{tag} Embedder {precision} vs x86-64", out / f"vectors-{precision}.npy",
            ctx["x86"] / f"vectors-{precision}.npy", args.min_cosine)
        cli_out = out / f"cli-{precision}.npy"
        run = gemma_edge([*ge, "embed", "--artifacts", str(ctx["art"]), "--input", str(texts),
                          "--output", str(cli_out), "--backend", "cpu", "--precision", precision],
                         env, work)
        if report.check(f"{tag} gemma-edge embed {precision}", run.returncode == 0,
                        (run.stdout.strip() or run.stderr.strip())[-200:]):
            figures["cosine"][f"CLI {precision}"] = compare_vectors(
                report, f"{tag} gemma-edge embed {precision} vs x86-64", cli_out,
                ctx["x86"] / f"vectors-{precision}.npy", args.min_cosine)
    if with_apps:
        try:
            arm = run_apps(ge, ctx["art"], work / f"apps-{runtime}", env, no_vec=False)
            same = arm["hits"] == ctx["apps_x86"]["hits"] and arm["labels"] == ctx["apps_x86"]["labels"]
            report.check(f"{tag} search + classify as on x86-64", same,
                         f"hits {arm['hits']}, labels {arm['labels']}")
            figures["apps"] = arm
        except bc.GemmaEdgeError as exc:
            report.check(f"{tag} search + classify", False, str(exc))
    return figures


def run_check(args: argparse.Namespace) -> int:
    start = time.monotonic()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    qemu = bc.check_host_tools()
    args.recipe = bc.make_recipe(bc.PROJECT / "pyproject.toml")
    ctx: dict[str, Any] = {"qemu": qemu}
    ctx["root"] = bc.cached(args.cache_dir, "rootfs", bc.rootfs_part(args.recipe),
                            lambda t: bc.build_rootfs(args.recipe, t))
    ctx["sites"] = {rt: bc.cached(args.cache_dir, f"site-{rt}", bc.site_part(args.recipe, rt),
                                  lambda t, rt=rt: bc.build_site(args.recipe, rt, t))
                    for rt in args.runtimes}
    ctx["wheel"] = bc.build_project(work)
    ctx["art"] = args.artifacts.resolve() if args.artifacts else bc.export_tiny(work)
    ctx["tpu_art"] = bc.with_compiled_entry(ctx["art"], work / "artifacts-edgetpu")
    from board_check_device import TEXTS

    (work / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    prepared = time.monotonic()
    bc.note(f"prepared in {prepared - start:.0f} s; x86-64 reference run")
    host_env = bc.board_env(Path(sys.executable).parent, work / "home-x86")
    ctx["x86"] = work / "x86-64"
    x86 = device_report([sys.executable], ctx["art"], ctx["tpu_art"], ctx["x86"], "ai-edge-litert",
                        args.precisions, host_env)
    ctx["apps_x86"] = run_apps([sys.executable, "-m", "gemma_edge.cli"], ctx["art"],
                               work / "apps-x86-64", host_env, no_vec=True)
    report = Report()
    summary: dict[str, Any] = {"recipe": args.recipe, "x86-64": x86, "runtimes": {},
                               "quick": args.quick}
    for i, runtime in enumerate(args.runtimes):
        first = i == 0
        bc.note(f"emulated arm64 run with {runtime} (timings under emulation mean nothing)")
        try:
            summary["runtimes"][runtime] = check_runtime(
                args, report, runtime, ctx, with_apps=first or not args.quick,
                with_scripts=first)
        except bc.GemmaEdgeError as exc:
            report.check(f"[{runtime}] emulated run", False, str(exc))
    summary["checks"] = report.checks
    summary["seconds"] = {"prepare": round(prepared - start, 1),
                          "total": round(time.monotonic() - start, 1)}
    atomic_write_json(work / "board-check.json", summary)
    failed = report.failed
    bc.note(f"{len(report.checks) - len(failed)}/{len(report.checks)} checks passed in "
            f"{time.monotonic() - start:.0f} s wall (emulated; not a latency); "
            f"report {work / 'board-check.json'}")
    if failed:
        print(f"board-check: error: {len(failed)} check(s) failed: {'; '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0
