"""FeatureCache: the public API over the catalogue, the segments and the index.

Reads take the shared lock for one operation, read the catalogue and touch only the rows they need
(through each segment's in-memory index). Writes add a segment (built in memory, written atomically)
and append it to the catalogue under the exclusive lock; merges (tiered, see merge.py) write their
output without the lock and swap it in under it. A kill -9 loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import time
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import CacheError, CacheMismatchError
from . import catalogue
from .files import CacheWarning, DiskFullError, atomic_write_bytes, flock, os_error_message
from .index import (
    KeyTable,
    SegmentIndex,
    ShaSet,
    hex_to_raw,
    keys_of,
    raw_to_hex,
    same_content_rows,
    sorted_keys,
    unique_first,
    without_keys,
)
from .labels import LabelsMixin
from .maintain import MaintainMixin
from .model import EXTRAS, LABELS, FeatureRows, GroupInfo, ImageMeta, default_cache_path, heads_text
from .segindex import _Seg, build_index
from .segment import (
    errors_table,
    group_heads,
    group_rows_checked,
    image_rows,
    read_rows,
    segment_bytes,
)

#: merge check every this many segments written by one process
MERGE_EVERY = 64


class FeatureCache(LabelsMixin, MaintainMixin):
    """Read and write a clipdet feature cache (layout: clipdet/cache/catalogue.py and segment.py)."""

    def __init__(self, path: str | os.PathLike | None = None, readonly: bool = False):
        self.path = str(path or default_cache_path())
        self.seg_dir = catalogue.seg_dir(self.path)
        self.pending_dir = catalogue.pending_dir(self.path)
        self.lock_path = self.path + ".lock"
        self.merge_lock_path = self.path + ".merge.lock"
        self.readonly = readonly
        self.damaged: set[str] = set()
        self._counter = itertools.count()
        self._written = 0
        self._index: dict[tuple, SegmentIndex] = {}
        self._memory: list[tuple[str, bytes]] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ sessions
    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, CacheWarning, stacklevel=3)

    @contextlib.contextmanager
    def _session(self) -> Iterator[list[_Seg]]:
        """Shared lock + the live segments, opened, with their indexes (oldest first)."""
        import h5py

        with flock(self.lock_path, exclusive=False, create=not self.readonly):
            cat = catalogue.read(self.path)
            segs: list[_Seg] = []
            try:
                # segments of killed writers are read (and adopted by the next writer); merged-away ones not
                orphans = self._scan_orphans(cat.segments, cat.retired)[0] if not cat.legacy else []
                sources = [(p, None) for p in cat.segments + orphans] + [(n, b) for n, b in self._memory]
                for p, data in sources:
                    try:
                        if data is None:
                            st = os.stat(p)
                            key = (p, st.st_ino, st.st_size, st.st_mtime_ns)
                            f = h5py.File(p, "r")
                        else:
                            key, st = (p, 0, len(data), 0), None
                            f = h5py.File(io.BytesIO(data), "r")
                    except FileNotFoundError:
                        self._warn(f"{p}: cache segment listed but missing; its images will be re-extracted")
                        continue
                    except OSError as e:
                        self._warn(f"{p}: damaged cache segment skipped ({e}); run clipdet cache verify --repair")
                        continue
                    try:
                        idx = self._index.get(key)
                        if idx is None:
                            idx = build_index(p, f, key[2])
                            self._index[key] = idx
                    except CacheError:
                        f.close()
                        raise
                    except Exception as e:  # noqa: BLE001 - any unreadable structure is damage
                        f.close()
                        self._warn(f"{p}: damaged cache segment skipped ({e}); run clipdet cache verify --repair")
                        continue
                    if idx.damage:
                        self._warn(f"{p}: {idx.damage[0]}; rebuilt from its hash column for this run; "
                                   "run clipdet cache verify --repair")
                    segs.append(_Seg(p, idx, f))
                live = {id(s.index) for s in segs}
                if len(self._index) > len(live):  # forget segments merged away (long-lived processes)
                    self._index = {k: v for k, v in self._index.items() if id(v) in live}
                yield segs
            finally:
                for s in segs:
                    s.file.close()

    def can_write(self) -> bool:
        """Whether this process may add segments (the cache folder, or where it would go, is writable)."""
        d = os.path.dirname(os.path.abspath(self.path))
        while not os.path.exists(d):
            d = os.path.dirname(d)
        if not os.access(d, os.W_OK):
            return False
        return not os.path.isdir(self.seg_dir) or os.access(self.seg_dir, os.W_OK)

    def drop_memory_segments(self) -> None:
        """Forget the batches a read-only cache keeps in memory (scoring does so after each chunk, so a
        long run over uncached images neither grows nor slows down)."""
        self._memory.clear()

    def segments(self) -> list[str]:
        """Paths of the live segment files, oldest first."""
        return catalogue.read(self.path).segments

    def exists(self) -> bool:
        """Whether the cache holds anything."""
        return bool(self._memory) or bool(catalogue.read(self.path).segments)

    # ------------------------------------------------------------------ reading: index only
    def groups(self, count: bool = True) -> list[GroupInfo]:
        """Every (backbone key, view) feature group with its recorded backbone and image count
        (`count=False`: count left 0, for callers that only need the attributes)."""
        import json

        found: dict[tuple[str, str], list] = {}
        with self._session() as segs:
            for s in segs:
                for k, gi in s.index.groups.items():
                    found.setdefault(k, [gi.attrs, [], set(gi.extras)])[1].append(gi.keys)
                    found[k][2] &= set(gi.extras)
        out = []
        for (key, view), (attrs, tables, extras) in sorted(found.items()):
            n = 0
            if count and len(tables) == 1:
                n = len(tables[0])
            elif count:
                k64 = np.concatenate([t.k64 for t in tables])
                n = len(unique_first(k64, np.concatenate([t.raw for t in tables]), np.arange(len(k64))))
            out.append(GroupInfo(key, view, json.loads(attrs["backbone"]), json.loads(attrs["layers"]),
                                 int(attrs["dim"]), n, group_heads(attrs),
                                 tuple(x for x in EXTRAS if x in extras)))
        return out

    def group(self, key: str, view: str) -> GroupInfo | None:
        """The attributes of feature group (key, view) (count left 0), or None when the cache has none."""
        return next((g for g in self.groups(count=False) if g.key == key and g.view == view), None)

    def cached_shas(self, key: str, view: str) -> ShaSet:
        """SHA-256 hex digests that have features for (key, view): a set-like view over the index
        (damaged rows found earlier in this process are left out, so they get re-extracted)."""
        with self._session() as segs:
            tables = [s.index.groups[(key, view)].keys for s in segs if (key, view) in s.index.groups]
        if self.damaged and tables:
            dk, draw = keys_of(sorted(self.damaged))
            bad = KeyTable(*sorted_keys(dk, draw))
            tables = [without_keys(t, bad) for t in tables]
        return ShaSet.of_tables(tables)

    # ------------------------------------------------------------------ reading: rows
    def load(
        self, key: str, view: str, shas: Iterable[str] | None = None, with_layers: bool = False,
        with_heads: bool = False, with_layers_mean: bool = False,
    ) -> FeatureRows:
        """Features of (key, view) as float32, in the order of `shas` (those found) or cache order;
        `with_layers` adds the --layers CLS tokens and, when every segment read holds them, the blocks'
        patch-token means (`layers_mean`; None otherwise); `with_layers_mean` requires those means,
        `with_heads` the --heads decomposition (heads, heads_rest). CacheError when the group was
        extracted without what is required.

        Only the requested rows are read. A row that fails its checksum, is not finite or is not unit
        length (or whose requested extras fail theirs) is damaged: it is skipped (a later copy is used if
        one exists), its hash is added to `self.damaged`, and a warning says so."""
        extras = ("layers",) * with_layers + ("layers_mean",) * with_layers_mean + ("heads", "heads_rest") * with_heads
        if with_layers and not with_layers_mean:
            extras += ("layers_mean?",)  # optional: read when every segment involved holds it
        with self._session() as segs:
            if shas is None:
                return self._load_all(segs, key, view, extras)
            wanted = list(shas)
            if not wanted:
                return FeatureRows([], np.zeros((0, 0), np.float32))
            return self._load_keys(segs, key, view, wanted, *keys_of(wanted), extras)

    def _require_extras(self, gi, key: str, view: str, extras: tuple[str, ...]) -> tuple[str, ...]:
        """The extras to read from a segment's group: `extras` ("name?" optional ones only where held);
        CacheError when a required one is missing."""
        missing = [x for x in extras if not x.endswith("?") and x not in gi.extras]
        if missing:
            hint = (" (caches written before clipdet 0.3 hold only the CLS tokens: extract again into a new "
                    "cache with --layers for the patch-token means)") if missing[0] == "layers_mean" else ""
            raise CacheError(f"{self.path}: features {key}/{view} were extracted without "
                             f"{EXTRAS[missing[0]]}{hint}")
        return tuple(x.rstrip("?") for x in extras if not x.endswith("?") or x[:-1] in gi.extras)

    def _load_keys(self, segs: list[_Seg], key: str, view: str, wanted: list[str], k64: np.ndarray,
                   raw: np.ndarray, extras: tuple[str, ...]) -> FeatureRows:
        """load() of `wanted` (hex digests, with their keys k64/raw) from the open segments."""
        have = np.zeros(len(wanted), bool)
        emb = None
        xs: dict[str, np.ndarray] = {}
        lacking: set[str] = set()  # optional extras some segment read lacks: left out of the result
        for s in segs:
            gi = s.index.groups.get((key, view))
            if gi is None:
                continue
            todo = np.flatnonzero(~have)
            if not len(todo):
                break
            rows = gi.keys.find(k64[todo], raw[todo])
            sel = rows >= 0
            if not sel.any():
                continue
            todo, rows = todo[sel], rows[sel]
            g = s.file[f"features/{key}/{view}"]
            here = self._require_extras(gi, key, view, extras)
            lacking |= {x[:-1] for x in extras if x.endswith("?")} - set(here)
            uniq, inv = np.unique(rows, return_inverse=True)
            e, ok, xv = group_rows_checked(g, uniq, here)  # a row is whole with its extras
            e, ok = e[inv].astype(np.float32), ok[inv]
            ok &= (hex_to_raw(read_rows(g["sha256"], uniq))[inv] == raw[todo]).all(axis=1)  # row holds that image
            if emb is None:
                emb = np.zeros((len(wanted), e.shape[1]), np.float32)
            for name, v in xv.items():
                if name not in xs:
                    xs[name] = np.zeros((len(wanted),) + v.shape[1:], np.float32)
                xs[name][todo[ok]] = v[inv][ok]
            emb[todo[ok]] = e[ok]
            have[todo[ok]] = True
            for i in todo[~ok]:
                self.damaged.add(wanted[i])
        if self.damaged.intersection(wanted):
            bad = sorted(self.damaged.intersection(wanted))
            self._warn(f"{self.path}: {len(bad)} cached feature row(s) damaged (first: {bad[0]}); "
                       "they are re-extracted where the file is available; run clipdet cache verify --repair")
        idx = np.flatnonzero(have)
        if emb is None:
            return FeatureRows([], np.zeros((0, 0), np.float32))
        return FeatureRows([wanted[i] for i in idx], emb[idx], **{n: v[idx] for n, v in xs.items()
                                                                   if n not in lacking})

    def _load_all(self, segs: list[_Seg], key: str, view: str, extras: tuple[str, ...]) -> FeatureRows:
        parts = []
        for s in segs:
            gi = s.index.groups.get((key, view))
            if gi is not None and gi.n:
                self._require_extras(gi, key, view, extras)  # fail before reading any row
                parts.append((s, gi))
        if not parts:
            return FeatureRows([], np.zeros((0, 0), np.float32))
        k64 = np.concatenate([gi.keys.k64 for _, gi in parts])
        raw = np.concatenate([gi.keys.raw for _, gi in parts])
        order = np.concatenate([(np.int64(i) << 40) + gi.keys.row for i, (_, gi) in enumerate(parts)])
        first = unique_first(k64, raw, order)
        return self._load_keys(segs, key, view, raw_to_hex(raw[first]), k64[first], raw[first], extras)

    def image_metas(self, shas: Iterable[str]) -> dict[str, ImageMeta]:
        """Metadata (paths, label, generator, size) of the given images, folded over all segments."""
        wanted = list(dict.fromkeys(shas))
        out: dict[str, ImageMeta] = {}
        if not wanted:
            return out
        k64, raw = keys_of(wanted)
        with self._session() as segs:
            for s in segs:
                rows = s.index.images.find(k64, raw)
                sel = np.flatnonzero(rows >= 0)
                if not len(sel):
                    continue
                found, expect = {}, {int(r): wanted[i] for i, r in zip(sel, rows[sel])}
                r_sorted = np.unique(rows[sel])
                for r, m in zip(r_sorted, image_rows(s.file, r_sorted)):
                    if m.sha256 == expect[int(r)]:  # else a damaged hash: the row belongs to no known image
                        found[int(r)] = m
                # rows of the same content repeated within one segment: fold each in file order
                for r in sorted(found):
                    m = found[r]
                    if m.sha256 in out:
                        out[m.sha256].merge(m)
                    else:
                        out[m.sha256] = m
                dup = same_content_rows(s.index.images, k64[sel], raw[sel], rows[sel])
                for r in dup:
                    for m in image_rows(s.file, np.array([r])):
                        if m.sha256 in out:
                            out[m.sha256].merge(m)
        return out

    def images(self) -> dict[str, ImageMeta]:
        """Metadata of every image (one Python object each: for small caches and tools, not hot paths)."""
        out: dict[str, ImageMeta] = {}
        with self._session() as segs:
            for s in segs:
                n = len(s.index.images)
                if not n:
                    continue
                for m in image_rows(s.file, np.arange(n)):
                    if m.sha256 in out:
                        out[m.sha256].merge(m)
                    else:
                        out[m.sha256] = m
        return out

    def stat_index(self):
        """The stat index next to this cache (see statindex.py)."""
        from .statindex import StatIndex

        return StatIndex(os.path.join(self.seg_dir, "stat.sqlite"), readonly=self.readonly)

    def errors(self) -> list[dict]:
        """Recorded per-file errors: dicts with sha256 (may be empty), path and reason (deduplicated)."""
        seen, out = set(), []
        with self._session() as segs:
            for s in segs:
                if not s.index.n_errors:
                    continue
                for e in errors_table(s.file):
                    if (e["path"], e["reason"]) not in seen:
                        seen.add((e["path"], e["reason"]))
                        out.append(e)
        return out

    def check_compatible(self, info, view: str, layers: Iterable[int], heads: dict | None = None) -> None:
        """Refuse (CacheMismatchError) when (info.key, view) holds features made differently: another
        backbone, layer set or head set (`heads` as recorded: {"blocks", "n_heads"}, None without)."""
        import json

        want = {"backbone": info.fingerprint(), "layers": list(layers), "heads": heads}
        with self._session() as segs:
            attrs = [s.index.groups[(info.key, view)].attrs for s in segs if (info.key, view) in s.index.groups]
        for a in attrs:
            b = json.loads(a["backbone"])
            have = {"backbone": {k: b.get(k) for k in ("arch", "weights_id", "preprocess")},
                    "layers": list(json.loads(a["layers"])), "heads": group_heads(a)}
            if not b.get("preprocess"):
                have["backbone"]["preprocess"] = want["backbone"]["preprocess"]
            if have != want:
                diff = [k for k in ("arch", "weights_id", "preprocess")
                        if have["backbone"].get(k) != want["backbone"].get(k)]
                if have["layers"] != want["layers"]:
                    diff.append(f"layers {have['layers']} vs {want['layers']}")
                if have["heads"] != want["heads"]:
                    diff.append(f"heads {heads_text(have['heads'])} vs {heads_text(want['heads'])}")
                raise CacheMismatchError(
                    f"{self.path}: features for {info.key}/{view} were made differently "
                    f"({', '.join(diff)} differ); use another --cache or the same settings"
                )

    # ------------------------------------------------------------------ writing
    def write_shard(
        self,
        features: dict[tuple[str, str], tuple[FeatureRows, dict]] | None = None,
        images: Iterable[ImageMeta] | dict = (),
        errors: Iterable[dict] = (),
    ) -> str | None:
        """Write one batch as a new segment, atomically, and add it to the catalogue; returns its path
        (None if nothing to write). `images`: ImageMeta records or a dict of columns (segment.write_images).
        `features` maps (key, view) → (rows, attrs) where attrs has backbone
        (dict), layers (list), dim. In read-only mode the segment is kept in memory only."""
        features = features or {}
        images = images if isinstance(images, dict) else list(images)
        errors = list(errors)
        if not features and not len(images) and not errors:
            return None
        data = segment_bytes(images, errors, features)
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}.h5"
        if self.readonly:
            self._memory.append((f"<memory>/{name}", data))
            return None
        final = os.path.join(self.seg_dir, name)
        try:
            os.makedirs(self.seg_dir, exist_ok=True)
            atomic_write_bytes(final, data)
        except DiskFullError:
            raise
        except OSError as e:
            raise CacheError(os_error_message(self.seg_dir, e)) from None
        self._update_catalogue(add=[final])
        self._written += 1
        if self._written % MERGE_EVERY == 0:
            self.auto_compact()
        return final

    # ------------------------------------------------------------------ summary
    def info(self) -> dict:
        """Backbones, views, counts per label and generator, size on disk: from the catalogue and index."""
        cat = catalogue.read(self.path)
        size = sum(os.path.getsize(s) for s in cat.segments if os.path.exists(s))
        if os.path.exists(self.path) and not cat.legacy:
            size += os.path.getsize(self.path)
        feats, n_images, n_errors, n_conflicts = [], 0, 0, 0
        if self.exists():
            with self._session() as segs:
                n_errors = sum(s.index.n_errors for s in segs)
                ik = [s.index.images.k64 for s in segs]
                ir = [s.index.images.raw for s in segs]
            if ik and sum(len(x) for x in ik):
                k64, raw = np.concatenate(ik), np.concatenate(ir)
                n_images = len(unique_first(k64, raw, np.arange(len(k64))))
            for g in self.groups():
                lab = self.labelled(g.key, g.view)
                codes = lab["label"]
                by_label = {LABELS[c] or "unlabelled": int((codes == c).sum()) for c in range(3) if (codes == c).any()}
                fake = codes == 2
                gens, counts = np.unique(lab["gen"][fake], return_counts=True)
                by_gen = {(lab["vocab"][int(c)] or "unknown"): int(n) for c, n in zip(gens, counts)}
                n_conflicts = max(n_conflicts, int(lab["conflict"].sum()))
                feats.append({
                    "backbone_key": g.key, "backbone": g.backbone.get("spec"),
                    "weights_id": g.backbone.get("weights_id"), "view": g.view, "dim": g.dim, "layers": g.layers,
                    "heads": g.heads,
                    "images": g.count, "labels": dict(sorted(by_label.items())),
                    "generators": dict(sorted(by_gen.items())),
                })
        return {
            "path": self.path, "format_version": 1 if cat.legacy else 2, "size_bytes": size,
            "segments": len(cat.segments), "pending_shards": self.shard_count() if cat.segments else 0,
            "images": n_images, "errors": n_errors, "conflicts": n_conflicts, "features": feats,
        }
