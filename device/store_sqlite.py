"""Opening the search index's SQLite file: the binding, the busy wait, sqlite-vec loading.

The file is opened through apsw when it is installed (the ``search`` extra), else
Python's sqlite3. Why apsw: many Pythons' sqlite3 cannot load extensions at all
(no ``enable_load_extension``: pyenv builds, this project's machines, possibly the
Coral Dev Board's 3.7), so with sqlite3 alone sqlite-vec would never load; apsw
ships its own SQLite with extension loading on. Both are autocommit here, so the
store's ``transaction()`` owns BEGIN/COMMIT either way.

A file another process is writing (an index run) is waited for up to
``busy_timeout`` seconds; ``is_busy`` tells that lock apart from a damaged file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from gemma_edge.errors import InputError

log = logging.getLogger("gemma_edge.device")

BUSY_TIMEOUT_S = 10.0  # how long to wait for another process's write to finish


def connect(path: Union[str, Path], busy_timeout: Optional[float] = None,
            binding: Optional[str] = None) -> tuple[Any, tuple]:
    """(connection, its error classes): apsw when installed, else sqlite3; autocommit,
    waiting up to ``busy_timeout`` s (default BUSY_TIMEOUT_S) for other writers.
    ``binding`` ("apsw" or "sqlite3") forces one."""
    busy_timeout = BUSY_TIMEOUT_S if busy_timeout is None else float(busy_timeout)
    if binding in (None, "apsw"):
        try:
            import apsw
        except ImportError:
            if binding == "apsw":
                raise InputError("apsw is not installed: pip install apsw") from None
        else:
            conn = apsw.Connection(str(path))
            set_timeout = getattr(conn, "set_busy_timeout", None) or conn.setbusytimeout
            set_timeout(int(busy_timeout * 1000))
            return conn, (apsw.Error,)
    import sqlite3

    conn = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout)
    return conn, (sqlite3.Error,)


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY/LOCKED from either binding: another connection holds the lock."""
    return "locked" in str(exc).lower() or type(exc).__name__ in ("BusyError", "LockedError")


def load_sqlite_vec(conn: Any) -> Optional[str]:
    """Load sqlite-vec into ``conn``; its version, or None (with the reason logged)."""
    try:
        import sqlite_vec
    except ImportError:
        log.debug("sqlite-vec not installed: exact numpy scan")
        return None
    if not hasattr(conn, "enable_load_extension"):
        log.debug("this Python's sqlite3 cannot load extensions (pip install apsw): "
                  "exact numpy scan")
        return None
    try:
        conn.enable_load_extension(True)
        try:
            sqlite_vec.load(conn)
        finally:
            conn.enable_load_extension(False)
        return str(conn.execute("SELECT vec_version()").fetchone()[0])
    except Exception as exc:  # noqa: BLE001 - any failure here means: use the numpy scan
        log.debug("sqlite-vec failed to load (%s): exact numpy scan", exc)
        return None


def sqlite_vec_available() -> Optional[str]:
    """sqlite-vec's version if a store opened here would use it, else None."""
    conn, _ = connect(":memory:")
    try:
        return load_sqlite_vec(conn)
    finally:
        conn.close()
