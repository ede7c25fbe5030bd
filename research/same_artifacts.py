"""Check that a refactoring left the export's artifacts byte for byte the same.

The tiny random checkpoint (``gemma_edge.export.tiny``) is exported with the
default options (every CPU bucket, the four full-int8 segment buckets; the quick
held-out evaluation off, it only adds figures to the manifest) and every file's
sha256 is recorded. Run ``record`` on the commit before a change and ``check``
after it::

    python -m research.same_artifacts record /tmp/ref      # on the old commit
    python -m research.same_artifacts check /tmp/ref       # on the new one

``check`` exports the recorded checkpoint again (the checkpoint itself is kept,
so the comparison does not depend on the tiny model being rebuilt identically)
and compares every file byte for byte (a .npz by its members: zip entries carry the
time they were written), and the manifest without its run-specific keys (time
stamps, paths). It exits 1 on any difference. ``--demo-shape`` uses the demo's
smaller export (buckets 16/32/64, one segment bucket) for a quicker check.

Not a committed test: the graphs' bytes depend on the installed torch,
litert-torch and ai-edge-quantizer versions, so recorded hashes only hold on
the machine (and environment) that recorded them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

# manifest keys that change on every run or with the folder the export ran in
VOLATILE = ("created", "export_seconds", "gemma_edge_version")
VOLATILE_SOURCE = ("checkpoint", "resolved")


def _options(demo_shape: bool) -> Any:
    from gemma_edge.export.pipeline import ExportOptions

    if demo_shape:
        return ExportOptions(buckets=(16, 32, 64), pool_slots=4, edgetpu_buckets=(32,),
                             evaluate=False)
    return ExportOptions(evaluate=False)


def _sha256(path: Path) -> str:
    """The file's sha256; for a .npz the sha256 of its members' names and bytes in order
    (a zip member carries the time it was written, so two identical exports differ there)."""
    digest = hashlib.sha256()
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                digest.update(info.filename.encode() + b"\0")
                digest.update(archive.read(info))
        return "npz-members:" + digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(art: Path) -> dict[str, Any]:
    files = {p.relative_to(art).as_posix(): _sha256(p) for p in sorted(art.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    manifest = json.loads((art / "manifest.json").read_text(encoding="utf-8"))
    for key in VOLATILE:
        manifest.pop(key, None)
    for key in VOLATILE_SOURCE:
        manifest.get("source", {}).pop(key, None)
    return {"files": files, "manifest": manifest}


def _export(checkpoint: Path, out: Path, demo_shape: bool) -> float:
    from gemma_edge.export.pipeline import run_export

    started = time.time()
    run_export(str(checkpoint), out, _options(demo_shape))
    return time.time() - started


def record(ref: Path, demo_shape: bool) -> int:
    import gemma_edge
    from gemma_edge.export.tiny import build_tiny_checkpoint

    ref.mkdir(parents=True, exist_ok=True)
    checkpoint = build_tiny_checkpoint(ref / "checkpoint")
    seconds = _export(checkpoint, ref / "artifacts", demo_shape)
    fingerprint = _fingerprint(ref / "artifacts")
    fingerprint.update(demo_shape=demo_shape, package=gemma_edge.__file__,
                       export_seconds=round(seconds, 1))
    (ref / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1, sort_keys=True),
                                          encoding="utf-8")
    print(f"recorded {len(fingerprint['files'])} files of {ref / 'artifacts'} "
          f"({seconds:.0f} s, package {gemma_edge.__file__})")
    return 0


def _diff(old: Any, new: Any, where: str = "manifest") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key not in new:
                out.append(f"{where}.{key}: missing now")
            elif key not in old:
                out.append(f"{where}.{key}: new")
            else:
                out.extend(_diff(old[key], new[key], f"{where}.{key}"))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def check(ref: Path, keep: Path | None) -> int:
    import gemma_edge

    recorded = json.loads((ref / "fingerprint.json").read_text(encoding="utf-8"))
    if (ref / "artifacts" / "manifest.json").is_file():  # hashed again: this script's rules
        recorded.update(_fingerprint(ref / "artifacts"))
    with tempfile.TemporaryDirectory(prefix="gemma-edge-same-") as tmp:
        out = keep if keep is not None else Path(tmp) / "artifacts"
        seconds = _export(ref / "checkpoint", out, recorded["demo_shape"])
        now = _fingerprint(out)
    old_files, new_files = recorded["files"], now["files"]
    problems = [f"{name}: missing now" for name in sorted(set(old_files) - set(new_files))]
    problems += [f"{name}: new file" for name in sorted(set(new_files) - set(old_files))]
    problems += [f"{name}: bytes differ" for name in sorted(set(old_files) & set(new_files))
                 if old_files[name] != new_files[name]]
    problems += _diff(recorded["manifest"], now["manifest"])
    same = len(set(old_files) & set(new_files)) - sum("bytes differ" in p for p in problems)
    print(f"package {gemma_edge.__file__}; export {seconds:.0f} s "
          f"(recorded {recorded['export_seconds']} s)")
    print(f"{same} of {len(old_files)} recorded files byte-identical")
    for line in problems:
        print(f"  DIFFERENT {line}")
    print("SAME ARTIFACTS" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.same_artifacts",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="build the tiny checkpoint, export it, record hashes")
    rec.add_argument("ref", type=Path, help="folder for the checkpoint, artifacts, hashes")
    rec.add_argument("--demo-shape", action="store_true",
                     help="the demo's smaller export (16/32/64, segments at 32)")
    chk = sub.add_parser("check", help="export the recorded checkpoint again and compare")
    chk.add_argument("ref", type=Path, help="a folder written by `record`")
    chk.add_argument("--keep", type=Path, default=None, help="keep the new export here")
    args = parser.parse_args(argv)
    if args.command == "record":
        return record(args.ref, args.demo_shape)
    if not (args.ref / "fingerprint.json").is_file():
        print(f"{args.ref}: no fingerprint.json; run `record` on the old commit first",
              file=sys.stderr)
        return 2
    return check(args.ref, args.keep)


if __name__ == "__main__":
    sys.exit(main())
