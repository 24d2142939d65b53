"""The feature cache: CLIP embeddings in HDF5, keyed by the SHA-256 of each image file's bytes.

On disk (see README "Feature cache layout"):

    clipdet.h5          the catalogue: names the live segments; replaced atomically (catalogue.py)
    clipdet.h5.d/       immutable segment files, one per extracted batch or merge (segment.py)
    clipdet.h5.lock     flock(2): readers shared for one operation, catalogue updates exclusive
    clipdet.h5.merge.lock   one merger at a time (merge.py: tiered, LSM-style)

Modules: files (locks, atomic writes, free space), segment (one file's layout), catalogue, index
(numpy columnar index), merge (tiered merging of files), conflicts, store (FeatureCache: sessions,
reads, batch writes), segindex (the live-segment index store builds), labels (label resolution from
the index), maintain (catalogue updates, v1 upgrade, orphans, merges), statindex (skip re-hashing),
transfer (Parquet / clip-retrieval import rows and export; `clipdet.extract.ingest` names the
backbone), verify (checksums, repair).
"""

from __future__ import annotations

from .files import DiskFullError
from .model import DEFAULT_CACHE, FORMAT, FORMAT_VERSION, FeatureRows, GroupInfo, ImageMeta, default_cache_path
from .store import CacheWarning, FeatureCache

#: an extraction run checks for merges every this many batches
AUTO_COMPACT_SHARDS = 64

__all__ = [
    "AUTO_COMPACT_SHARDS", "CacheWarning", "DEFAULT_CACHE", "DiskFullError", "FORMAT", "FORMAT_VERSION",
    "FeatureCache", "FeatureRows", "GroupInfo", "ImageMeta", "default_cache_path", "read_plain",
]


def read_plain(path, key: str, view: str = "clean"):
    """Example of reading a cache with nothing but h5py (mirrors the README): every segment the
    catalogue names, oldest first; the first row of an image wins."""
    import os

    import h5py
    import numpy as np

    shas, embs, seen = [], [], set()
    with h5py.File(path, "r") as cat:
        names = [n.decode() if isinstance(n, bytes) else n for n in cat["segment_names"][()]]
    for name in names:
        with h5py.File(os.path.join(str(path) + ".d", name), "r") as f:
            if f"features/{key}/{view}" not in f:
                continue
            g = f[f"features/{key}/{view}"]
            for s, e in zip(g["sha256"][()], g["embedding"][()]):
                if s not in seen:
                    seen.add(s)
                    shas.append(s.decode())
                    embs.append(e.astype(np.float32))
    return shas, (np.stack(embs) if embs else np.zeros((0, 0), np.float32))
