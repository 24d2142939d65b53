"""The catalogue: `clipdet.h5`, a small HDF5 file naming the live segments, replaced atomically.

    /                  attrs: format="clipdet-cache", format_version=2, kind="catalogue", generation
    /segment_names     strings, oldest first (segment files live in `clipdet.h5.d/`)
    /segments/<name>   HDF5 external links to each segment, so plain h5py can browse the whole cache:
                       h5py.File("cache/clipdet.h5")["segments/<name>/features/<key>/clean/embedding"]

A cache written by clipdet 0.1 (format v1: one data file plus `clipdet.h5.pending/` shards) is read
as "legacy": the main file and its shards act as segments, oldest first.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from ..errors import CacheError
from .files import atomic_write_bytes
from .model import decode
from .segment import check_header, write_header


@dataclass
class Catalogue:
    """What a cache path holds now: segment file paths (oldest first) and whether it is a v1 cache."""

    segments: list[str]
    legacy: bool = False
    generation: int = 0
    exists: bool = False
    retired: list[str] = field(default_factory=list)  # merged away: to delete, never to adopt


def seg_dir(path: str) -> str:
    """Folder of a cache's segment files."""
    return path + ".d"


def pending_dir(path: str) -> str:
    """Folder of a version-1 cache's shards."""
    return path + ".pending"


def _v1_shards(path: str) -> list[str]:
    d = pending_dir(path)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".h5"))


def read(path: str) -> Catalogue:
    """Read the catalogue at `path` (or the v1 file and shards there)."""
    import h5py

    if not os.path.exists(path):
        shards = _v1_shards(path)
        return Catalogue(shards, legacy=bool(shards), exists=False)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _damaged(path, e) from None
    with f:
        version = check_header(f, path, kinds=("catalogue",))
        if version < 2:
            return Catalogue([path] + _v1_shards(path), legacy=True, exists=True)
        try:
            names = decode(f["segment_names"][()]) if "segment_names" in f else []
            retired = decode(f["retired_names"][()]) if "retired_names" in f else []
        except (OSError, KeyError, ValueError) as e:
            raise _damaged(path, e) from None
        gen = int(f.attrs.get("generation", 0))
    d = seg_dir(path)
    return Catalogue([os.path.join(d, n) for n in names], generation=gen, exists=True,
                     retired=[os.path.join(d, n) for n in retired])


class CatalogueDamagedError(CacheError):
    """The catalogue file cannot be read while its segment folder exists: `cache verify --repair`
    rebuilds it from the segments."""


def _damaged(path: str, e: Exception) -> CacheError:
    d = seg_dir(path)
    if os.path.isdir(d) and any(n.endswith(".h5") for n in os.listdir(d)):
        return CatalogueDamagedError(
            f"{path}: cannot read the feature cache: its catalogue is damaged ({e}); the segments in "
            f"{os.path.basename(d)}/ are kept: run clipdet cache verify --repair to rebuild the catalogue from them")
    return CacheError(f"{path}: cannot read the feature cache ({e})")


def rebuild(path: str) -> tuple[list[str], list[str]]:
    """Rebuild a lost or damaged catalogue from the segment files (call under the exclusive lock):
    every readable seg-/mrg- file, less those a merge output says it replaced (attr `replaces`), in
    cache order (attr order_ns / created_ns, see segment.order_ns). Returns (segments, unreadable files,
    left out of the catalogue)."""
    import h5py

    from .segment import order_ns

    d = seg_dir(path)
    found, replaced, unreadable = [], set(), []
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if not (n.startswith(("seg-", "mrg-")) and n.endswith(".h5")):
            continue
        p = os.path.join(d, n)
        try:
            with h5py.File(p, "r") as f:
                check_header(f, p)
                found.append((order_ns(f, p), n))
                rep = f.attrs.get("replaces")
                if rep is not None:
                    import json

                    replaced.update(json.loads(rep))
        except (OSError, CacheError, ValueError):
            unreadable.append(p)
    live = [os.path.join(d, n) for _, n in sorted(found) if n not in replaced]
    write(path, live, 1)
    return live, unreadable


def write(path: str, segments: list[str], generation: int, retired: list[str] = ()) -> None:
    """Atomically replace the catalogue at `path` with `segments` (paths inside seg_dir(path)).

    `retired`: segments this update merged away, deleted right after; a process killed before deleting
    them leaves them named here, so the next writer deletes them instead of adopting them as orphans."""
    import h5py

    from .model import str_dtype

    names = [os.path.basename(s) for s in segments]
    rel = os.path.basename(seg_dir(path))
    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        write_header(f, kind="catalogue")
        f.attrs["generation"] = int(generation)
        f.create_dataset("segment_names", data=names, dtype=str_dtype())
        f.create_dataset("retired_names", data=[os.path.basename(s) for s in retired], dtype=str_dtype())
        g = f.create_group("segments")
        for n in names:
            g[n] = h5py.ExternalLink(f"{rel}/{n}", "/")
    atomic_write_bytes(path, bio.getvalue())
