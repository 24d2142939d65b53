"""`clipdet cache verify [--repair]`: find bit rot (checksums, non-finite or non-unit rows) in every
segment; with repair, rewrite damaged segments without their damaged rows and set unreadable ones
aside as *.bad. Verification reads everything once, chunk by chunk."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .segment import group_extras, group_rows_checked

CHUNK = 4096


@dataclass
class VerifyReport:
    """Per-segment findings: unreadable segments and damaged rows (segment, group, sha256)."""

    segments: int = 0
    rows: int = 0
    unreadable: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)   # listed by the catalogue, not on disk
    rebuilt: int | None = None   # repair rebuilt a damaged catalogue from this many segments
    damaged: list[tuple[str, str, str]] = field(default_factory=list)
    bad_index: list[tuple[str, str, str]] = field(default_factory=list)  # (segment, table, why)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.unreadable and not self.missing and not self.damaged and not self.bad_index


def _bad_rows(g) -> np.ndarray:
    """Row numbers of a feature group that fail their checksum or are not finite unit vectors."""
    n, extras, bad = len(g["embedding"]), group_extras(g), []
    for s in range(0, n, CHUNK):
        rows = np.arange(s, min(n, s + CHUNK))
        bad.extend(rows[~group_rows_checked(g, rows, extras)[1]].tolist())
    return np.array(bad, dtype=np.int64)


def _check_table(rep: VerifyReport, path: str, name: str, g, column: np.ndarray) -> np.ndarray:
    """Cross-check table `g`'s stored search index (sorted, digests, row range) and its sha256 `column`
    (each row's hash is the one the index gives it); returns the rows with a damaged hash."""
    from .index import KeyTable
    from .merge import hash_mismatches

    tab = KeyTable.load(g, len(column))
    if tab is not None and (why := tab.damage()):
        rep.bad_index.append((path, name, f"search index damaged ({why})"))
        return np.zeros(0, np.int64)
    return hash_mismatches(g, column)


def verify(cache, repair: bool = False) -> VerifyReport:
    """Check every live segment of `cache`; with `repair`, drop damaged rows and set aside unreadable
    segments (their images are re-extracted by the next run that meets them)."""


    if repair:  # one merger at a time: a repair must not race a merge of the same segment
        from .files import flock

        with flock(cache.merge_lock_path, exclusive=True, create_dir=True):
            rebuilt = _rebuild_if_damaged(cache)
            rep = _verify(cache, repair)
            if rebuilt is not None:
                rep.rebuilt, unreadable = rebuilt
                rep.unreadable += unreadable
            return rep
    return _verify(cache, repair)


def _rebuild_if_damaged(cache) -> tuple[int, list[str]] | None:
    """A catalogue that cannot be read is rebuilt from the segment files (the damaged file is kept as
    clipdet.h5.bad; unreadable segment files are set aside as *.bad). Returns (segments, unreadable)
    or None when the catalogue was fine."""
    import shutil

    from . import catalogue
    from .files import flock, replace

    try:
        catalogue.read(cache.path)
        return None
    except catalogue.CatalogueDamagedError:
        pass
    with flock(cache.lock_path, exclusive=True, create_dir=True):
        try:
            catalogue.read(cache.path)
            return None
        except catalogue.CatalogueDamagedError:
            shutil.copyfile(cache.path, cache.path + ".bad")
            live, unreadable = catalogue.rebuild(cache.path)
        for p in unreadable:
            replace(p, p + ".bad")
    return len(live), unreadable


def _verify(cache, repair: bool) -> VerifyReport:
    import h5py

    from .segment import feature_groups

    rep = VerifyReport()
    for path in cache.segments():
        rep.segments += 1
        try:
            f = h5py.File(path, "r")
        except OSError:
            (rep.unreadable if os.path.exists(path) else rep.missing).append(path)
            continue
        damaged_before = len(rep.damaged) + len(rep.bad_index)
        try:
            with f:
                col = f["images/sha256"][()]
                for r in _check_table(rep, path, "images", f["images"], col):
                    rep.damaged.append((path, "images", col[r].decode(errors="replace")))
                for key, view in feature_groups(f):
                    g = f[f"features/{key}/{view}"]
                    col = g["sha256"][()]
                    rep.rows += len(col)
                    bad = np.union1d(_bad_rows(g), _check_table(rep, path, f"{key}/{view}", g, col))
                    rep.damaged += [(path, f"{key}/{view}", col[r].decode(errors="replace")) for r in bad]
        except (OSError, KeyError):
            rep.unreadable.append(path)
            continue
        if repair and len(rep.damaged) + len(rep.bad_index) > damaged_before:  # damaged rows or index
            _rewrite_without(cache, path)
            rep.repaired.append(path)
    if repair and (rep.unreadable or rep.missing):
        cache._set_aside(rep.unreadable + rep.missing)
    return rep


def _rewrite_without(cache, path: str) -> None:
    """Replace segment `path` by a copy without its damaged rows (atomic catalogue swap). The copy is a
    one-segment merge: it streams the segment in slices and leaves out every row that fails its checks."""
    import time

    import h5py

    from .files import removed_on_failure
    from .merge import merge_files

    out = os.path.join(cache.seg_dir, f"mrg-{os.getpid()}-{time.time_ns():020d}.h5")  # committed by the catalogue
    with removed_on_failure(out):
        with h5py.File(path, "r") as f:
            merge_files([f], out, replaces=[path])
    cache._update_catalogue(replace=([path], out))
