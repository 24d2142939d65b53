"""The feature cache: CLIP embeddings in HDF5, keyed by the SHA-256 of each image file's bytes.

On disk (see README "Feature cache layout"):

    clipdet.h5            the compacted cache, only ever replaced whole (write temp file, fsync, rename)
    clipdet.h5.pending/   shard files, one per extracted batch, each a small file of the same layout,
                          written to a temp name and renamed when complete
    clipdet.h5.lock       flock(2) lock file: readers take it shared, compaction exclusive

Every file has the same layout, readable with plain h5py:

    /                      attrs: format="clipdet-cache", format_version, clipdet_version
    /images/{sha256,label,generator,width,height,format,paths}       one row per image content
    /features/<backbone key>/<view>/{sha256,embedding[,layers]}      float16, L2-normalised rows
           attrs: backbone (JSON: spec, arch, weights, weights_id, preprocess), layers (JSON), dim
    /errors/{sha256,path,reason}                                     files that could not be used

Crash safety: a SIGKILL loses only the batch whose shard was not yet renamed; a half-written temp
file is ignored and removed later. Concurrency: any number of writers each write their own shards;
compaction (end of each run, `clipdet cache compact`) merges them under the exclusive lock,
removing duplicates. Readers see the main file plus every complete shard.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._version import __version__
from .errors import CacheError, CacheMismatchError

FORMAT = "clipdet-cache"
FORMAT_VERSION = 1
DEFAULT_CACHE = os.path.join("cache", "clipdet.h5")
COPY_CHUNK = 32768
AUTO_COMPACT_SHARDS = 512

try:  # POSIX advisory locks; elsewhere clipdet runs without them (one writer at a time)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def default_cache_path() -> str:
    """CLIPDET_CACHE if set, else cache/clipdet.h5 (relative to the working directory)."""
    return os.environ.get("CLIPDET_CACHE") or DEFAULT_CACHE


@dataclass
class ImageMeta:
    """Per-image metadata; one row per distinct file content."""

    sha256: str
    label: str = ""
    generator: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    paths: list[str] = field(default_factory=list)

    def merge(self, other: ImageMeta) -> None:
        """Fold a later observation of the same content in: new paths, newer non-empty fields."""
        for p in other.paths:
            if p not in self.paths:
                self.paths.append(p)
        for name in ("label", "generator", "format"):
            if getattr(other, name):
                setattr(self, name, getattr(other, name))
        if other.label == "real":
            self.generator = other.generator
        if other.width:
            self.width, self.height = other.width, other.height


@dataclass
class FeatureRows:
    """Rows of one (backbone, view) feature group: hashes, embeddings, optional layer CLS tokens."""

    sha256: list[str]
    embedding: np.ndarray
    layers: np.ndarray | None = None


@dataclass
class GroupInfo:
    """Summary of one feature group across the main file and all shards."""

    key: str
    view: str
    backbone: dict
    layers: list[int]
    dim: int
    count: int


def _str_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


def _decode(a) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a]


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FeatureCache:
    """Read and write a clipdet feature cache (see module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = str(path or default_cache_path())
        self.pending_dir = self.path + ".pending"
        self.lock_path = self.path + ".lock"
        self._counter = itertools.count()

    # ------------------------------------------------------------------ locking & sources
    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """flock on the lock file. Writers create it (and the folder); readers of a cache they cannot
        write (read-only mount, someone else's folder) read without a lock rather than fail."""
        if exclusive:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if exclusive:
                raise CacheError(f"{self.lock_path}: cannot create the cache lock file (read-only location?)") from None
            fd = -1
        if fd < 0:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _shards(self) -> list[str]:
        if not os.path.isdir(self.pending_dir):
            return []
        return sorted(
            os.path.join(self.pending_dir, n) for n in os.listdir(self.pending_dir) if n.endswith(".h5")
        )

    def _sources(self) -> list[str]:
        return ([self.path] if os.path.exists(self.path) else []) + self._shards()

    @contextlib.contextmanager
    def _open_all(self) -> Iterator[list]:
        """Open the main file and all shards read-only under the shared lock."""
        import h5py

        with self._lock(exclusive=False):
            files = []
            try:
                for src in self._sources():
                    try:
                        f = h5py.File(src, "r")
                    except (OSError, FileNotFoundError) as e:
                        if src == self.path:
                            raise CacheError(f"{src}: cannot read the feature cache ({e})") from None
                        continue  # a shard removed or damaged between listing and opening
                    if f.attrs.get("format") not in (FORMAT, FORMAT.encode()):
                        f.close()
                        raise CacheError(f"{src}: not a clipdet feature cache")
                    version = int(f.attrs.get("format_version", 0))
                    if version > FORMAT_VERSION:
                        f.close()
                        raise CacheError(f"{src}: cache made by a newer clipdet (format v{version})")
                    files.append(f)
                yield files
            finally:
                for f in files:
                    f.close()

    def exists(self) -> bool:
        """Whether any feature data (main file or shards) exists."""
        return bool(self._sources())

    # ------------------------------------------------------------------ reading
    def groups(self) -> list[GroupInfo]:
        """Every (backbone key, view) feature group with its recorded backbone and image count."""
        return [gi for gi, _ in self._scan_groups()]

    def _scan_groups(self) -> list[tuple[GroupInfo, set[bytes]]]:
        """One pass over all files: each group's info and the set of its hashes."""
        found: dict[tuple[str, str], GroupInfo] = {}
        shas: dict[tuple[str, str], set] = {}
        with self._open_all() as files:
            for f in files:
                feats = f.get("features")
                if feats is None:
                    continue
                for key in feats:
                    for view in feats[key]:
                        g = feats[key][view]
                        k = (key, view)
                        if k not in found:
                            found[k] = GroupInfo(
                                key, view, json.loads(g.attrs["backbone"]), json.loads(g.attrs["layers"]),
                                int(g.attrs["dim"]), 0,
                            )
                            shas[k] = set()
                        shas[k].update(g["sha256"][()].tolist())
        for k, gi in found.items():
            gi.count = len(shas[k])
        return sorted(((gi, shas[k]) for k, gi in found.items()), key=lambda t: (t[0].key, t[0].view))

    def cached_shas(self, key: str, view: str) -> set[str]:
        """SHA-256 hex digests that have features for (key, view)."""
        out: set[bytes] = set()
        with self._open_all() as files:
            for f in files:
                g = f.get(f"features/{key}/{view}")
                if g is not None:
                    out.update(g["sha256"][()].tolist())
        return {s.decode() for s in out}

    def load(
        self, key: str, view: str, shas: Iterable[str] | None = None, with_layers: bool = False
    ) -> FeatureRows:
        """Features of (key, view) as float32, in the order of `shas` (those found) or cache order."""
        wanted = None if shas is None else [s.encode() if isinstance(s, str) else s for s in shas]
        wanted_set = None if wanted is None else set(wanted)
        rows: dict[bytes, int] = {}
        parts_e, parts_l, order = [], [], []
        with self._open_all() as files:
            for f in files:
                g = f.get(f"features/{key}/{view}")
                if g is None:
                    continue
                s = g["sha256"][()]
                take = [i for i, h in enumerate(s.tolist())
                        if h not in rows and (wanted_set is None or h in wanted_set)]
                if not take:
                    continue
                idx = np.asarray(take)
                full = len(idx) > len(s) // 2  # one contiguous read beats scattered reads
                emb = g["embedding"][()][idx] if full else g["embedding"][idx]
                parts_e.append(emb.astype(np.float32))
                if with_layers:
                    if "layers" not in g:
                        raise CacheError(f"{self.path}: features {key}/{view} were extracted without --layers")
                    parts_l.append(g["layers"][idx].astype(np.float32))
                for i in take:
                    rows[s[i]] = len(order)
                    order.append(s[i])
        emb = np.concatenate(parts_e) if parts_e else np.zeros((0, 0), np.float32)
        lay = np.concatenate(parts_l) if parts_l else None
        if wanted is not None:
            sel = [rows[h] for h in wanted if h in rows]
            order = [order[i] for i in sel]
            emb = emb[sel] if len(sel) else emb[:0]
            lay = lay[sel] if lay is not None and len(sel) else lay
        return FeatureRows([h.decode() for h in order], emb, lay)

    def images(self) -> dict[str, ImageMeta]:
        """Per-image metadata merged over the main file and shards (later observations win)."""
        out: dict[str, ImageMeta] = {}
        with self._open_all() as files:
            for f in files:
                for m in _read_images(f):
                    if m.sha256 in out:
                        out[m.sha256].merge(m)
                    else:
                        out[m.sha256] = m
        return out

    def errors(self) -> list[dict]:
        """Recorded per-file errors: dicts with sha256 (may be empty), path and reason (deduplicated)."""
        seen, out = set(), []
        with self._open_all() as files:
            for f in files:
                g = f.get("errors")
                if g is None:
                    continue
                for s, p, r in zip(_decode(g["sha256"][()]), _decode(g["path"][()]), _decode(g["reason"][()])):
                    if (p, r) not in seen:
                        seen.add((p, r))
                        out.append({"sha256": s, "path": p, "reason": r})
        return out

    def check_compatible(self, info, view: str, layers: Iterable[int]) -> None:
        """Refuse (CacheMismatchError) when (info.key, view) holds features made differently."""
        want = {"backbone": info.fingerprint(), "layers": list(layers)}  # order matters: (n, L, W) rows
        with self._open_all() as files:
            for f in files:
                g = f.get(f"features/{info.key}/{view}")
                if g is None:
                    continue
                b = json.loads(g.attrs["backbone"])
                have = {
                    "backbone": {k: b.get(k) for k in ("arch", "weights_id", "preprocess")},
                    "layers": list(json.loads(g.attrs["layers"])),
                }
                if not b.get("preprocess"):
                    have["backbone"]["preprocess"] = want["backbone"]["preprocess"]
                if have != want:
                    diff = [k for k in ("arch", "weights_id", "preprocess")
                            if have["backbone"].get(k) != want["backbone"].get(k)]
                    if have["layers"] != want["layers"]:
                        diff.append(f"layers {have['layers']} vs {want['layers']}")
                    raise CacheMismatchError(
                        f"{self.path}: features for {info.key}/{view} were made differently "
                        f"({', '.join(diff)} differ); use another --cache or the same settings"
                    )

    # ------------------------------------------------------------------ writing
    def write_shard(
        self,
        features: dict[tuple[str, str], tuple[FeatureRows, dict]] | None = None,
        images: Iterable[ImageMeta] = (),
        errors: Iterable[dict] = (),
    ) -> str | None:
        """Write one batch as a new shard, atomically; returns its path (None if nothing to write).

        `features` maps (key, view) → (rows, attrs) where attrs has backbone (dict), layers (list), dim.
        """
        features = features or {}
        images = list(images)
        errors = list(errors)
        if not features and not images and not errors:
            return None
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}.h5"
        final = os.path.join(self.pending_dir, name)
        tmp = os.path.join(self.pending_dir, f".{name}.tmp")
        for attempt in range(3):
            os.makedirs(self.pending_dir, exist_ok=True)
            try:
                _write_file(tmp, images, errors, features)
                break
            except FileNotFoundError:  # another process's compaction removed the (then empty) folder
                if attempt == 2:
                    raise
        os.replace(tmp, final)
        return final

    def compact(self) -> int:
        """Merge all complete shards into the main file (atomic replace); returns shards merged."""
        import h5py

        with self._lock(exclusive=True):
            shards = self._shards()
            self._remove_stale_temps()
            if not shards:
                return 0
            sources = ([self.path] if os.path.exists(self.path) else []) + shards
            tmp = f"{self.path}.compact-{os.getpid()}.tmp"
            opened, merged, bad = [], [], []
            try:
                for src in sources:
                    try:
                        f = h5py.File(src, "r")
                    except OSError as e:
                        if src == self.path:
                            raise CacheError(f"{src}: cannot read the feature cache ({e})") from None
                        bad.append(src)
                        continue
                    if src != self.path and not all(k in f for k in ("images", "errors")):
                        f.close()
                        bad.append(src)
                        continue
                    opened.append(f)
                    if src != self.path:
                        merged.append(src)
                _merge_files(opened, tmp)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            finally:
                for f in opened:
                    f.close()
            os.replace(tmp, self.path)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            for s in merged:
                with contextlib.suppress(OSError):
                    os.remove(s)
            for s in bad:  # never deleted: set aside (readers ignore *.bad) for a person to inspect
                with contextlib.suppress(OSError):
                    os.replace(s, s + ".bad")
                warnings.warn(f"{s}: unreadable cache shard set aside as {os.path.basename(s)}.bad", stacklevel=2)
            with contextlib.suppress(OSError):
                os.rmdir(self.pending_dir)
            return len(merged)

    def _remove_stale_temps(self) -> None:
        """Remove temp files left by killed processes (their pid no longer runs)."""
        dirs = [self.pending_dir, os.path.dirname(os.path.abspath(self.path))]
        for d in dirs:
            if not os.path.isdir(d):
                continue
            for n in os.listdir(d):
                if not n.endswith(".tmp"):
                    continue
                if d == self.pending_dir:
                    pid = n.split("-")[1] if n.count("-") >= 2 else ""
                elif n.startswith(os.path.basename(self.path) + ".compact-"):
                    pid = n.rsplit("-", 1)[1].split(".")[0]
                else:
                    continue
                if pid.isdigit() and not _pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(d, n))

    def shard_count(self) -> int:
        """Number of complete shards waiting to be compacted."""
        return len(self._shards())

    # ------------------------------------------------------------------ summary
    def info(self) -> dict:
        """Backbones, views, counts per label and generator, and size on disk, as a JSON-able dict."""
        imgs = self.images() if self.exists() else {}
        scanned = self._scan_groups() if self.exists() else []
        size = sum(os.path.getsize(s) for s in self._sources())
        feats = []
        for g, raw in scanned:
            shas = {h.decode() for h in raw}
            by_label: dict[str, int] = {}
            by_gen: dict[str, int] = {}
            for s in shas:
                m = imgs.get(s)
                lab = (m.label if m else "") or "unlabelled"
                by_label[lab] = by_label.get(lab, 0) + 1
                if m and m.label == "fake":
                    gen = m.generator or "unknown"
                    by_gen[gen] = by_gen.get(gen, 0) + 1
            feats.append({
                "backbone_key": g.key, "backbone": g.backbone.get("spec"), "weights_id": g.backbone.get("weights_id"),
                "view": g.view, "dim": g.dim, "layers": g.layers, "images": g.count,
                "labels": dict(sorted(by_label.items())), "generators": dict(sorted(by_gen.items())),
            })
        return {
            "path": self.path, "size_bytes": size, "pending_shards": self.shard_count(),
            "images": len(imgs), "errors": len(self.errors()) if self.exists() else 0, "features": feats,
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_images(f) -> list[ImageMeta]:
    g = f.get("images")
    if g is None or len(g["sha256"]) == 0:
        return []
    cols = {n: g[n][()] for n in ("sha256", "label", "generator", "width", "height", "format", "paths")}
    out = []
    for i in range(len(cols["sha256"])):
        paths = cols["paths"][i]
        paths = paths.decode() if isinstance(paths, bytes) else paths
        out.append(ImageMeta(
            cols["sha256"][i].decode(), _decode([cols["label"][i]])[0], _decode([cols["generator"][i]])[0],
            int(cols["width"][i]), int(cols["height"][i]), _decode([cols["format"][i]])[0],
            [p for p in paths.split("\n") if p],
        ))
    return out


def _write_images(f, images: list[ImageMeta]) -> None:
    sd = _str_dtype()
    g = f.create_group("images")
    g.create_dataset("sha256", data=np.array([m.sha256.encode() for m in images], dtype="S64"))
    for name in ("label", "generator", "format"):
        g.create_dataset(name, data=[getattr(m, name) for m in images], dtype=sd)
    g.create_dataset("width", data=np.array([m.width for m in images], dtype=np.int32))
    g.create_dataset("height", data=np.array([m.height for m in images], dtype=np.int32))
    g.create_dataset("paths", data=["\n".join(m.paths) for m in images], dtype=sd)


def _write_errors(f, errors: list[dict]) -> None:
    sd = _str_dtype()
    g = f.create_group("errors")
    for name in ("sha256", "path", "reason"):
        g.create_dataset(name, data=[str(e.get(name) or "") for e in errors], dtype=sd)


def _new_file(path: str):
    import h5py

    f = h5py.File(path, "w")
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["clipdet_version"] = __version__
    return f


def _group_attrs(g, attrs: dict) -> None:
    g.attrs["backbone"] = json.dumps(attrs["backbone"], sort_keys=True)
    g.attrs["layers"] = json.dumps(list(attrs.get("layers") or []))
    g.attrs["dim"] = int(attrs["dim"])
    g.attrs["clipdet_version"] = attrs.get("clipdet_version", __version__)


def _write_file(path: str, images, errors, features) -> None:
    with _new_file(path) as f:
        _write_images(f, images)
        _write_errors(f, errors)
        fg = f.create_group("features")
        for (key, view), (rows, attrs) in features.items():
            g = fg.require_group(key).create_group(view)
            _group_attrs(g, attrs)
            g.create_dataset("sha256", data=np.array([s.encode() for s in rows.sha256], dtype="S64"))
            g.create_dataset("embedding", data=np.asarray(rows.embedding, dtype=np.float16))
            if rows.layers is not None:
                g.create_dataset("layers", data=np.asarray(rows.layers, dtype=np.float16))
    _fsync_file(path)


def _merge_files(files: list, out_path: str) -> None:
    """Write the union of `files` (earlier files win on duplicate hashes) into `out_path`."""
    images: dict[str, ImageMeta] = {}
    errors, seen_err = [], set()
    for f in files:
        for m in _read_images(f):
            if m.sha256 in images:
                images[m.sha256].merge(m)
            else:
                images[m.sha256] = m
        g = f.get("errors")
        if g is not None:
            for s, p, r in zip(_decode(g["sha256"][()]), _decode(g["path"][()]), _decode(g["reason"][()])):
                if (p, r) not in seen_err:
                    seen_err.add((p, r))
                    errors.append({"sha256": s, "path": p, "reason": r})
    with _new_file(out_path) as out:
        _write_images(out, list(images.values()))
        _write_errors(out, errors)
        fg = out.create_group("features")
        groups: dict[tuple[str, str], list] = {}
        for f in files:
            feats = f.get("features")
            if feats is None:
                continue
            for key in feats:
                for view in feats[key]:
                    groups.setdefault((key, view), []).append(feats[key][view])
        for (key, view), srcs in groups.items():
            first = srcs[0]
            ref = (json.loads(first.attrs["backbone"]).get("weights_id"), first.attrs["layers"],
                   int(first.attrs["dim"]))
            g = fg.require_group(key).create_group(view)
            for name in first.attrs:
                g.attrs[name] = first.attrs[name]
            has_layers = "layers" in first
            dim = int(first.attrs["dim"])
            ds_s = g.create_dataset("sha256", shape=(0,), maxshape=(None,), dtype="S64", chunks=(COPY_CHUNK,))
            ds_e = g.create_dataset("embedding", shape=(0, dim), maxshape=(None, dim), dtype=np.float16,
                                    chunks=(min(COPY_CHUNK, max(1, 2**20 // (2 * dim))), dim))
            ds_l = None
            if has_layers:
                lshape = first["layers"].shape[1:]
                ds_l = g.create_dataset("layers", shape=(0,) + lshape, maxshape=(None,) + lshape, dtype=np.float16,
                                        chunks=True)
            seen: set[bytes] = set()
            for src in srcs:
                this = (json.loads(src.attrs["backbone"]).get("weights_id"), src.attrs["layers"], int(src.attrs["dim"]))
                if this != ref or (("layers" in src) != has_layers):
                    raise CacheMismatchError(
                        f"{src.file.filename}: features for {key}/{view} do not match the cache's; "
                        "move that shard away to compact"
                    )
                n = len(src["sha256"])
                for start in range(0, n, COPY_CHUNK):
                    s = src["sha256"][start:start + COPY_CHUNK]
                    keep = np.array([h not in seen for h in s.tolist()], dtype=bool)
                    if not keep.any():
                        continue
                    seen.update(s[keep].tolist())
                    k = int(keep.sum())
                    m = len(ds_s)
                    ds_s.resize((m + k,))
                    ds_s[m:] = s[keep]
                    e = src["embedding"][start:start + COPY_CHUNK][keep]
                    ds_e.resize((m + k, dim))
                    ds_e[m:] = e
                    if ds_l is not None:
                        lay = src["layers"][start:start + COPY_CHUNK][keep]
                        ds_l.resize((m + k,) + ds_l.shape[1:])
                        ds_l[m:] = lay
    _fsync_file(out_path)


def read_plain(path: str | Path, key: str, view: str = "clean") -> tuple[list[str], np.ndarray]:
    """Example of reading a compacted cache with nothing but h5py (mirrors the README)."""
    import h5py

    with h5py.File(path, "r") as f:
        g = f[f"features/{key}/{view}"]
        return [s.decode() for s in g["sha256"][()]], g["embedding"][()].astype(np.float32)
