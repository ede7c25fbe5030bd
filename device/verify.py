"""Artifact files checked against the manifest's SHA-256 at their first open, then remembered.

Why: a byte flipped in a graph, a table or a segment gives wrong vectors with no
error (cosine 0.53-0.9996 to the clean output), so every file is hashed before the
device trusts it. Hashing all of the real artifacts (~1.8 GB) at every start would cost
seconds on a board, so each file is hashed lazily, at the first open of THAT file (an
int8 user never hashes the float graph), and the result is remembered in a small
record keyed by the file's stat: a later open whose size, mtime_ns, inode and ctime_ns
still match costs one ``stat()``. ctime cannot be set from user space, so a change
that restores the mtime (``cp -p``, ``touch -d``) is hashed again too. What a stat
match cannot see is a change that bypasses the file system (bit rot on the medium).

The record lives in the cache folder (``$GEMMA_EDGE_CACHE_DIR`` or
``~/.cache/gemma-edge``), ``verified/<device>-<inode of the artifacts folder>.json``,
not in the artifacts folder: the export lists every file of its folder in the
manifest (a record there would be listed, then change size), and on a board the
artifacts are often read-only. Keyed by the folder's inode, it survives the export's
rename of its staging folder and a ``mv``. It is written atomically (temp file +
rename); a record that is unreadable or does not match the file's stat is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from gemma_edge.atomic_files import atomic_write_json, sha256_file
from gemma_edge.errors import ArtifactError
from gemma_edge.manifest import MANIFEST_NAME

log = logging.getLogger("gemma_edge.device")


def stat_stamp(st: os.stat_result) -> list[int]:
    """What must stay equal for a remembered hash to stay valid."""
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino), int(st.st_ctime_ns)]


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when missing or unreadable (then re-hashed)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class FileVerifier:
    """``check(name)``: the artifact file's SHA-256 once it matches the manifest.

    enabled=False (``--no-verify``) hashes nothing: a file whose record still matches
    its stat reports its remembered hash, any other reports None (unknown).
    """

    def __init__(self, art_dir: Path, files: dict[str, Any], enabled: bool,
                 state_dir: Optional[Path]):
        self.art_dir, self.files, self.enabled = Path(art_dir), files, bool(enabled)
        self.record_path: Optional[Path] = None
        if state_dir is not None:
            st = os.stat(self.art_dir)
            self.record_path = Path(state_dir) / "verified" / f"{st.st_dev}-{st.st_ino}.json"
        self._known: dict[str, Optional[str]] = {}
        self._warned = False
        self.hash_seconds = 0.0  # time spent hashing in this process (bench, tests)

    def _records(self) -> dict[str, Any]:
        if self.record_path is None:
            return {}
        files = read_record(self.record_path).get("files")
        return files if isinstance(files, dict) else {}

    def check(self, name: str) -> Optional[str]:
        """The verified SHA-256 of ``name`` (relative to the artifacts folder).

        Raises ArtifactError when verifying and the file is unlisted, unreadable or
        differs from the manifest.
        """
        if name in self._known:
            return self._known[name]
        path = self.art_dir / name
        info = self.files.get(name)
        if info is None:
            if self.enabled:
                raise ArtifactError(f"{path}: not listed in {self.art_dir / MANIFEST_NAME}'s "
                                    "'files', so it cannot be verified; re-export, or skip the "
                                    "check with --no-verify (verify_files=False)")
            self._known[name] = None
            return None
        try:
            before = os.stat(path)
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read it ({exc.strerror}); copy the whole "
                                "artifacts directory again") from exc
        record = self._records().get(name)
        if (isinstance(record, dict) and record.get("stamp") == stat_stamp(before)
                and record.get("sha256") == info["sha256"]):
            self._known[name] = info["sha256"]
            return info["sha256"]
        if not self.enabled:
            self._known[name] = None
            return None
        start = time.perf_counter()
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read it ({exc.strerror}); the file or its "
                                "medium is damaged, copy the artifacts again") from exc
        seconds = time.perf_counter() - start
        self.hash_seconds += seconds
        if digest != info["sha256"]:
            raise ArtifactError(f"{path}: SHA-256 {digest[:12]}... differs from the manifest's "
                                f"{info['sha256'][:12]}...; the file changed or is corrupted "
                                "since the export, copy the whole artifacts directory again")
        log.log(logging.INFO if seconds > 0.5 else logging.DEBUG,  # say why a first start waits
                "gemma-edge: verified %s (%.0f MB in %.2f s, once)", name, before.st_size / 1e6,
                seconds)
        self._known[name] = digest
        if stat_stamp(os.stat(path)) == stat_stamp(before):  # unchanged while hashed
            self._remember(name, stat_stamp(before), digest)
        return digest

    def _remember(self, name: str, stamp: list[int], digest: str) -> None:
        """Add one file to the record, merged with what other processes wrote meanwhile."""
        if self.record_path is None:
            if not self._warned:
                self._warned = True
                log.warning("gemma-edge: no writable cache folder to record verified hashes "
                            "in; each start hashes the artifacts again (set GEMMA_EDGE_CACHE_DIR "
                            "to a writable folder, or skip the check with --no-verify)")
            return
        files = {k: v for k, v in self._records().items() if k in self.files}
        files[name] = {"sha256": digest, "stamp": stamp}
        try:
            atomic_write_json(self.record_path, {"artifacts": str(self.art_dir.resolve()),
                                                 "files": files})
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("gemma-edge: cannot record verified hashes in %s (%s); each start "
                            "hashes the artifacts again (set GEMMA_EDGE_CACHE_DIR to a writable "
                            "folder, or skip the check with --no-verify)",
                            self.record_path.parent, exc.strerror)
