"""The artifacts directory contract: ``manifest.json``, its file hashes, the staged export folder.

Shared by the workstation (which writes artifacts) and the device (which reads
them), so it imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .atomic_files import current_umask, sha256_file
from .errors import ArtifactError, InputError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
log = logging.getLogger("gemma_edge.manifest")
GRAPH_ROLES = ("float", "int8", "int8-shared", "edgetpu", "edgetpu-compiled")


# The export's staging and swap-out folders beside ``--out``: ``.NAME.staging-PID-XXXXXXXX``
# (mkdtemp's 8 random characters) and ``.NAME.old-PID``; the PID names the owner, so the
# next export removes only what dead exports left behind (SIGKILL, power loss).
_STAGING = r"\.{name}\.staging-(?P<pid>\d+)-[a-z0-9_]{{8}}"
_LEGACY_STAGING = r"\.{name}\.staging-[a-z0-9_]{{8}}"  # before the names held a PID
_OLD = r"\.{name}\.old-(?P<pid>\d+)"


def is_artifacts_folder(folder: Path) -> bool:
    """Does ``folder`` hold a manifest.json written by `gemma-edge export`?"""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and "format_version" in manifest
            and "gemma_edge_version" in manifest)


def _holds(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(final: Path, force: bool = False, protect: Sequence[Path] = ()) -> Path:
    """Refuse an output path whose replacement would lose what the project did not make.

    An export replaces ``final`` as a whole, so it may only be missing, an empty folder or
    an earlier export (its manifest.json); ``force`` allows any other folder, but never a
    file nor a folder holding a ``protect`` path (the checkpoint being read), the current
    directory or the home directory. Returns ``final`` resolved.
    """
    given = Path(final)
    final = given.expanduser().resolve()
    if final.is_file() or (final.exists() and not final.is_dir()):
        raise InputError(f"{given}: is a file, not a folder; the export writes a folder of "
                         "files there. Pass a new or empty folder (--force never replaces a file)")
    guarded = [(Path(p).expanduser().resolve(), "the checkpoint being exported") for p in protect]
    guarded += [(Path.cwd().resolve(), "the current directory"),
                (Path.home().resolve(), "your home directory")]
    for path, what in guarded:
        if _holds(final, path):
            raise InputError(f"{given}: holds {what} ({path}); refusing to replace it, even with "
                             "--force. Pass a new or empty folder for the artifacts")
    parent = next((p for p in final.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"{given}: {parent} is a file, not a folder; pass another --out")
    if not final.is_dir() or force or is_artifacts_folder(final):
        return final
    with contextlib.suppress(OSError):  # unreadable: not provably empty, refused below
        if next(final.iterdir(), None) is None:
            return final
    raise InputError(f"{given}: exists and is not a gemma-edge artifacts folder (no manifest.json "
                     "from `gemma-edge export`); the export would replace it and delete its "
                     "contents. Pass a new or empty folder, or add --force to replace this one")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we wrote: treat as alive, never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process; anything else: unsure
        return True
    return True


def clean_stale_staging(final: Path) -> list[Path]:
    """Remove staging folders beside ``final`` left by exports that are no longer running.

    Only entries whose names follow this module's pattern for ``final`` and whose owner
    PID is dead are removed, and only real folders (never a symlink's target). Swapped-out
    old folders (``.NAME.old-PID``) are removed only when they are artifacts folders;
    anything else of ours that cannot be proven stale (names without a PID from older
    versions, files) is reported in the log and kept. Returns the removed paths.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    name = re.escape(final.name)
    staging, legacy, old = (re.compile(p.format(name=name)) for p in (_STAGING, _LEGACY_STAGING, _OLD))
    removed = []
    for entry in sorted(final.parent.iterdir()):
        match = staging.fullmatch(entry.name) or old.fullmatch(entry.name)
        if match is None:
            if legacy.fullmatch(entry.name):
                log.warning("%s: staging folder of an earlier export (no owner recorded); "
                            "delete it if no export to %s is running", entry, final)
            continue
        if _pid_alive(int(match["pid"])):
            continue
        ours = entry.is_dir() and not entry.is_symlink() and (
            match.re is staging or is_artifacts_folder(entry))
        if not ours:
            log.warning("%s: left by an export that is no longer running, but not a folder "
                        "it made; kept, delete it yourself if it is not needed", entry)
            continue
        shutil.rmtree(entry)
        log.info("removed %s (left by an export that is no longer running, pid %s)",
                 entry, match["pid"])
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_directory(final: Path, force: bool = False, protect: Sequence[Path] = ()
                     ) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final``, on error it goes.

    Export takes minutes and can fail at verification: an artifacts directory is
    either complete or absent, never half-written. ``final`` must pass
    ``check_output_folder`` (``force``, ``protect``) before and again at the swap, so
    a folder filled meanwhile is kept (and so is the finished export, named in the error).
    """
    final = check_output_folder(final, force, protect)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{final.parent}: cannot create the folder ({exc.strerror}); "
                         "pass another --out") from exc
    clean_stale_staging(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-{os.getpid()}-",
                                    dir=final.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        check_output_folder(final, force, protect)
    except InputError as exc:
        raise InputError(f"{final} changed during the export ({exc}); the finished export is "
                         f"in {staging}: move it where you want it (the next export to {final} "
                         "removes it)") from exc
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in names}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ints(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)


def _is_relative(value: Any) -> bool:
    """A path inside the artifacts folder: relative, no '..' (a manifest cannot point outside)."""
    return (isinstance(value, str) and bool(value) and not os.path.isabs(value)
            and ".." not in Path(value).parts)


INSIDE = "a path inside the artifacts folder"
# What the device reads without further checks: (key, test, what it must be).
_MODEL_KEYS = (("hidden_size", _is_int, "an int"), ("output_dim", _is_int, "an int"),
               ("mrl_dims", _is_ints, "a non-empty list of ints"))
_GRAPH_KEYS = (("role", lambda v: isinstance(v, str), "a string"),
               ("path", _is_relative, INSIDE), ("pool_slots", _is_int, "an int"))
_FILE_KEYS = (("sha256", lambda v: isinstance(v, str) and len(v) == 64, "a 64-digit hex string"),
              ("bytes", _is_int, "an int"))


def _require(path: Path, where: str, obj: Any, keys: Any) -> None:
    for key, test, what in keys:
        if not isinstance(obj, dict) or key not in obj:
            raise ArtifactError(f"{path}: {where} has no {key!r} entry; the manifest is "
                                "incomplete, re-export")
        if not test(obj[key]):
            raise ArtifactError(f"{path}: {where} {key!r} is {str(obj[key])[:40]!r}, not "
                                f"{what}; the manifest is damaged, re-export")


def check_manifest_shape(path: Path, manifest: dict[str, Any]) -> None:
    """Every entry the device reads is there with the right type, else an ArtifactError
    naming manifest.json and the missing or bad key (was an AttributeError or KeyError)."""
    is_dict = (lambda v: isinstance(v, dict), "an object")
    _require(path, "the manifest", manifest,
             [(k, *is_dict) for k in ("model", "files", "tokenizer", "embedding_tables")]
             + [("graphs", lambda v: isinstance(v, list), "a list"),
                ("buckets", _is_ints, "a non-empty list of ints")])
    _require(path, "'model'", manifest["model"], _MODEL_KEYS)
    _require(path, "'tokenizer'", manifest["tokenizer"],
             [("kind", lambda v: isinstance(v, str), "a string"),
              ("file", _is_relative, INSIDE)])
    tables = manifest["embedding_tables"]
    _require(path, "'embedding_tables'", tables, [("float", *is_dict)])
    for kind, table in tables.items():
        _require(path, f"embedding table {kind!r}", table, [("path", _is_relative, INSIDE)])
    for number, graph in enumerate(manifest["graphs"]):
        _require(path, f"graph {number}", graph, _GRAPH_KEYS)
        lens = graph.get("seq_lens", [graph.get("seq_len")])
        if not _is_ints(lens):
            raise ArtifactError(f"{path}: graph {number} ({graph['path']}) has no int 'seq_lens' "
                                "or 'seq_len'; the manifest is damaged, re-export")
    for name, info in manifest["files"].items():
        if not _is_relative(name):
            raise ArtifactError(f"{path}: file {name!r} is not a path inside the artifacts "
                                "folder; the manifest is damaged, re-export")
        _require(path, f"file {name!r}", info, _FILE_KEYS)


def load_manifest(art_dir: Path, verify_hashes: bool = False) -> dict[str, Any]:
    """Read and sanity-check ``ART/manifest.json``.

    Sizes are always checked (cheap, catches truncated copies to a board);
    SHA-256 of every file only when asked. The device's Embedder instead hashes each
    file at its first open and remembers it (device/verify.py).
    """
    art_dir = Path(art_dir)
    path = art_dir / MANIFEST_NAME
    if not art_dir.is_dir():
        raise ArtifactError(f"{art_dir}: not a directory; pass the folder `gemma-edge export` wrote")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {art_dir} is not a gemma-edge artifacts directory "
                            "(run `gemma-edge export --out DIR` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable JSON ({exc}); re-run the export") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: a JSON {type(manifest).__name__}, not the object "
                            "`gemma-edge export` writes; re-export")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {version!r}, this gemma-edge reads "
                            f"{FORMAT_VERSION}; re-export with this version")
    check_manifest_shape(path, manifest)
    for name, info in manifest["files"].items():
        file = art_dir / name
        if not file.is_file():
            raise ArtifactError(f"{file}: listed in the manifest but missing; copy the whole "
                                "artifacts directory again")
        if file.stat().st_size != info["bytes"]:
            raise ArtifactError(f"{file}: {file.stat().st_size} bytes, manifest says "
                                f"{info['bytes']}; the copy is truncated or corrupted")
        if verify_hashes and sha256_file(file) != info["sha256"]:
            raise ArtifactError(f"{file}: SHA-256 differs from the manifest; the file is corrupted")
    return manifest


def find_graph(manifest: dict[str, Any], role: str, seq_len: Optional[int] = None
               ) -> Optional[dict[str, Any]]:
    """The manifest entry for ``role`` (covering ``seq_len`` if given), or None."""
    for graph in manifest.get("graphs", []):
        if graph.get("role") != role:
            continue
        lens = graph.get("seq_lens") or [graph.get("seq_len")]
        if seq_len is None or seq_len in lens:
            return graph
    return None


def graphs_for_role(manifest: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [g for g in manifest.get("graphs", []) if g.get("role") == role]


def artifact_id(manifest: dict[str, Any]) -> str:
    """A short stable id of the exported MODEL: ties search indexes to the weights that built them.

    It hashes the source weights and the output size, not the graph files, so
    adding a compiled Edge TPU graph or re-quantising keeps existing indexes valid
    (all precisions embed into the same space); a different checkpoint does not.
    """
    digest = hashlib.sha256()
    digest.update(str(manifest.get("source", {}).get("weights_sha256", "")).encode())
    digest.update(str(manifest.get("model", {}).get("output_dim", "")).encode())
    if not manifest.get("source", {}).get("weights_sha256"):  # hand-made manifests
        for name in sorted(manifest["files"]):
            digest.update(name.encode())
            digest.update(manifest["files"][name]["sha256"].encode())
    return digest.hexdigest()[:16]
