"""The stat index: (device, inode, size, mtime_ns) → sha256 per absolute path, so a re-run over files
already cached does not read them again (like git's index).

Racy-clean protection, as git does it: an entry recorded less than RACY_NS after the file's own
mtime could describe a file modified again within the filesystem's timestamp granularity, so it is
not trusted: that file is hashed again (and its entry refreshed). `--rehash` ignores the index.
The index is an optimisation only: if it cannot be read or written, clipdet hashes everything.
Moved or renamed files miss the index and are hashed, then recognised by content as before.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable

from ..errors import printable

#: entries recorded within this many ns of the file's mtime are re-hashed (coarsest common mtime: 2 s)
RACY_NS = 2_000_000_000
_CHUNK = 900  # variables per query (older SQLite builds allow at most 999)


class StatIndex:
    """SQLite table path → (dev, ino, size, mtime_ns, sha256, recorded_ns, meta)."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly

    def _connect(self, write: bool):
        if not write and not os.path.exists(self.path):
            return None
        if write:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        con = sqlite3.connect(self.path if write else f"file:{self.path}?mode=ro", timeout=30, uri=not write)
        if write:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, "
                        "size INTEGER, mtime_ns INTEGER, sha256 TEXT, recorded_ns INTEGER, meta INTEGER)")
        return con

    def lookup(self, paths: list[str], stats: list) -> dict[int, tuple[str, bool]]:
        """For each position whose file is unchanged since it was recorded (and not racy):
        (sha256, whether its path and labels were recorded in the cache)."""
        out: dict[int, tuple[str, bool]] = {}
        try:
            con = self._connect(write=False)
        except sqlite3.Error:
            return out
        if con is None:
            return out
        try:
            pos = {printable(p): i for i, p in enumerate(paths) if stats[i] is not None}  # SQLite text: UTF-8
            keys = list(pos)
            for s in range(0, len(keys), _CHUNK):
                part = keys[s:s + _CHUNK]
                q = f"SELECT path, dev, ino, size, mtime_ns, sha256, recorded_ns, meta FROM files WHERE path IN " \
                    f"({','.join('?' * len(part))})"
                for path, dev, ino, size, mtime_ns, sha, rec, meta in con.execute(q, part):
                    i = pos[path]
                    st = stats[i]
                    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (dev, ino, size, mtime_ns):
                        continue
                    if rec - mtime_ns < RACY_NS:
                        continue  # racy: recorded too soon after the file's last change
                    out[i] = (sha, bool(meta))
        except sqlite3.Error:
            return {}
        finally:
            con.close()
        return out

    def record(self, entries: Iterable[tuple[str, os.stat_result, str, bool]], stat_ns: int | None = None) -> None:
        """Remember (path, stat taken before hashing, sha256, metadata recorded) after a run's data is durable.

        `stat_ns`: when the stats were taken (before the files were read); the racy check compares the
        file's mtime with it, not with the end of the run."""
        if self.readonly:
            return
        when = time.time_ns() if stat_ns is None else int(stat_ns)
        rows = [(printable(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha, when, int(meta))
                for p, st, sha, meta in entries]
        if not rows:
            return
        with contextlib.suppress(sqlite3.Error, OSError):
            con = self._connect(write=True)
            try:
                with con:
                    # never downgrade: a scoring run (meta=0) does not erase an extract's meta=1
                    con.executemany(
                        "INSERT INTO files VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET "
                        "dev=excluded.dev, ino=excluded.ino, size=excluded.size, mtime_ns=excluded.mtime_ns, "
                        "recorded_ns=excluded.recorded_ns, meta=CASE WHEN files.sha256=excluded.sha256 "
                        "THEN max(files.meta, excluded.meta) ELSE excluded.meta END, sha256=excluded.sha256",
                        rows)
            finally:
                con.close()


def stat_all(paths: list[str]) -> list:
    """os.stat of each path (None where it fails: the normal read reports the error)."""
    out = []
    for p in paths:
        try:
            out.append(os.stat(p))
        except OSError:
            out.append(None)
    return out
