"""The artifacts directory contract: ``manifest.json``, file hashes, atomic writes.

Shared by the workstation (which writes artifacts) and the device (which reads
them), so it imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPH_ROLES = ("float", "int8", "int8-shared", "edgetpu", "edgetpu-compiled")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_npy(path: Path, array: Any) -> None:
    """``np.save`` through ``atomic_write_bytes`` (numpy imported here: the module stays stdlib-only)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_npz(path: Path, arrays: dict[str, Any], compressed: bool = False) -> None:
    """``np.savez[_compressed]`` through ``atomic_write_bytes``."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final``, on error it goes.

    Export takes minutes and can fail at verification: an artifacts directory is
    either complete or absent, never half-written.
    """
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in names}


def load_manifest(art_dir: Path, verify_hashes: bool = False) -> dict[str, Any]:
    """Read and sanity-check ``ART/manifest.json``.

    Sizes are always checked (cheap, catches truncated copies to a board);
    SHA-256 only when asked (hashing 700 MB takes a while on a Dev Board).
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
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {version!r}, this gemma-edge reads "
                            f"{FORMAT_VERSION}; re-export with this version")
    for key in ("graphs", "files", "model", "buckets", "tokenizer", "embedding_tables"):
        if key not in manifest:
            raise ArtifactError(f"{path}: no {key!r} entry; the manifest is incomplete, re-export")
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
