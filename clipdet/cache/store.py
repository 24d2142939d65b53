"""FeatureCache: the public API over the catalogue, the segments and the index.

Reads take the shared lock for one operation, read the catalogue and touch only the rows they need
(through each segment's in-memory index). Writes add a segment (built in memory, written atomically)
and append it to the catalogue under the exclusive lock; merges (tiered, see merge.py) write their
output without the lock and swap it in under it. A kill -9 loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CacheError, CacheMismatchError
from . import catalogue
from .files import DiskFullError, atomic_write_bytes, flock, fsync_dir, os_error_message, pid_alive, try_flock
from .index import KeyTable, SegmentIndex, ShaSet, group_ids, keys_of, raw_to_hex, unique_first
from .model import LABELS, FeatureRows, GroupInfo, ImageMeta, default_cache_path
from .segment import check_header, errors_table, feature_groups, image_columns, image_rows, read_rows, segment_bytes

#: tolerance on the L2 norm of a stored (float16, L2-normalised) embedding before it counts as damaged
NORM_TOLERANCE = 0.02
#: merge check every this many segments written by one process
MERGE_EVERY = 64


class CacheWarning(UserWarning):
    """A problem with the cache that the run works around (damaged segment or rows, read-only)."""


@dataclass
class _Seg:
    path: str
    index: SegmentIndex
    file: object  # open h5py.File


def _attrs(g) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}


def build_index(name: str, f, size: int) -> SegmentIndex:
    """Index one open segment file."""
    from .conflicts import read_conflicts

    version = check_header(f, name)
    im = f.get("images")
    itab = KeyTable.load(im, len(im["sha256"])) if im is not None and "sha256" in im else None
    cols = image_columns(f, with_sha=itab is None)
    itab = itab or KeyTable.build(cols["sha256"])
    idx = SegmentIndex(name, itab, cols["label"], cols["gen"], cols["vocab"],
                       size=size, version=version, conflicts=read_conflicts([f]))
    for key, view in feature_groups(f):
        g = f[f"features/{key}/{view}"]
        from .index import GroupIndex

        n = len(g["sha256"])
        tab = KeyTable.load(g, n) or KeyTable.build(g["sha256"][()])
        idx.groups[(key, view)] = GroupIndex(tab, _attrs(g), "layers" in g, n)
    e = f.get("errors/path")
    idx.n_errors = 0 if e is None else len(e)
    return idx


class FeatureCache:
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
                orphans = self._scan_orphans(cat.segments)[0] if not cat.legacy else []  # adopted at next write
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
                    segs.append(_Seg(p, idx, f))
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
                    found.setdefault(k, [gi.attrs, []])[1].append(gi.keys)
        out = []
        for (key, view), (attrs, tables) in sorted(found.items()):
            n = 0
            if count and len(tables) == 1:
                n = len(tables[0])
            elif count:
                k64 = np.concatenate([t.k64 for t in tables])
                n = len(unique_first(k64, np.concatenate([t.raw for t in tables]), np.arange(len(k64))))
            out.append(GroupInfo(key, view, json.loads(attrs["backbone"]), json.loads(attrs["layers"]),
                                 int(attrs["dim"]), n))
        return out

    def cached_shas(self, key: str, view: str) -> ShaSet:
        """SHA-256 hex digests that have features for (key, view): a set-like view over the index
        (damaged rows found earlier in this process are left out, so they get re-extracted)."""
        with self._session() as segs:
            tables = [s.index.groups[(key, view)].keys for s in segs if (key, view) in s.index.groups]
        if self.damaged and tables:
            dk, draw = keys_of(sorted(self.damaged))
            bad = KeyTable(*_sorted(dk, draw))
            tables = [_without(t, bad) for t in tables]
        return ShaSet.of_tables(tables)

    def labelled(self, key: str, view: str) -> dict:
        """The group's images with their resolved labels, as arrays in cache order (oldest first):
        raw (n, 32) digests, label codes (0 none, 1 real, 2 fake), gen codes into `vocab`, conflict flags.

        Index only. The common case (one big segment, distinct keys) is joined in key order without
        copying the index; memory is a few arrays of n entries."""
        with self._session() as segs:
            fast = _aligned_labels(segs, key, view)
            if fast is not None:
                return fast
            tabs = [(i, s.index.groups[(key, view)].keys) for i, s in enumerate(segs) if (key, view) in s.index.groups]
            gk, graw, gorder = _distinct_oldest(tabs)
            vocab, code = [""], {"": 0}
            parts, recorded = [], []
            for i, s in enumerate(segs):
                t = s.index.images
                remap = np.array([code.setdefault(v, len(code)) for v in s.index.vocab], np.int32)
                if len(t):
                    parts.append((i, t, s.index.label[t.row], remap[s.index.gen[t.row]]))
                recorded += [c[0] for c in s.index.conflicts]
            vocab = [v for v, _ in sorted(code.items(), key=lambda t: t[1])]
        n = len(gk)
        label, gen, conflict = np.zeros(n, np.int8), np.zeros(n, np.int32), np.zeros(n, bool)
        if parts:
            table, u_lab, u_gen, u_con = _resolve_labels(parts)
            at = table.find(gk, graw)  # both in key order: cache-friendly
            has = np.flatnonzero(at >= 0)
            label[has], gen[has], conflict[has] = u_lab[at[has]], u_gen[at[has]], u_con[at[has]]
            del table, u_lab, u_gen, u_con, at
        if recorded:
            rk, rr = keys_of(sorted(set(recorded)))
            conflict |= KeyTable(*_sorted(rk, rr)).find(gk, graw) >= 0
        o = np.argsort(gorder, kind="stable")  # cache order: oldest segment first, file order within
        return {"raw": graw[o], "label": label[o], "gen": gen[o], "conflict": conflict[o], "vocab": vocab}

    # ------------------------------------------------------------------ reading: rows
    def load(
        self, key: str, view: str, shas: Iterable[str] | None = None, with_layers: bool = False
    ) -> FeatureRows:
        """Features of (key, view) as float32, in the order of `shas` (those found) or cache order.

        Only the requested rows are read. A row that fails its checksum, is not finite or is not unit
        length is damaged: it is skipped (a later copy is used if one exists), its hash is added to
        `self.damaged`, and a warning says so."""
        with self._session() as segs:
            if shas is None:
                return self._load_all(segs, key, view, with_layers)
            wanted = list(shas)
            if not wanted:
                return FeatureRows([], np.zeros((0, 0), np.float32), None)
            k64, raw = keys_of(wanted)
            have = np.zeros(len(wanted), bool)
            emb = lay = None
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
                if with_layers and not gi.has_layers:
                    raise CacheError(f"{self.path}: features {key}/{view} were extracted without --layers")
                uniq, inv = np.unique(rows, return_inverse=True)
                e, ok = self._read_checked(g, "embedding", uniq, s.path)
                if emb is None:
                    emb = np.zeros((len(wanted), e.shape[1]), np.float32)
                e, ok = e[inv], ok[inv]
                emb[todo[ok]] = e[ok]
                if with_layers:
                    lv, lok = self._read_checked(g, "layers", uniq, s.path, check_norm=False)
                    if lay is None:
                        lay = np.zeros((len(wanted),) + lv.shape[1:], np.float32)
                    lay[todo[ok]] = lv[inv][ok]
                have[todo[ok]] = True
                for i in todo[~ok]:
                    self.damaged.add(wanted[i])
            if self.damaged.intersection(wanted):
                bad = sorted(self.damaged.intersection(wanted))
                self._warn(f"{self.path}: {len(bad)} cached feature row(s) damaged (first: {bad[0]}); "
                           "they are re-extracted where the file is available; run clipdet cache verify --repair")
            idx = np.flatnonzero(have)
            if emb is None:
                return FeatureRows([], np.zeros((0, 0), np.float32), None)
            return FeatureRows([wanted[i] for i in idx], emb[idx], None if lay is None else lay[idx])

    def _read_checked(self, g, name: str, rows: np.ndarray, path: str, check_norm: bool = True):
        """Rows of dataset `name` as float32 and a mask of the undamaged ones."""
        ds = g[name]
        try:
            x = read_rows(ds, rows).astype(np.float32)
            ok = np.ones(len(rows), bool)
        except OSError:  # a checksum (fletcher32) failure somewhere in the span: read row by row
            x = np.zeros((len(rows),) + ds.shape[1:], np.float32)
            ok = np.zeros(len(rows), bool)
            for j, r in enumerate(rows):
                with contextlib.suppress(OSError):
                    x[j] = ds[int(r)]
                    ok[j] = True
        flat = x.reshape(len(x), -1)
        ok &= np.isfinite(flat).all(axis=1)
        if check_norm:
            ok &= np.abs(np.linalg.norm(np.where(np.isfinite(flat), flat, 0), axis=1) - 1) <= NORM_TOLERANCE
        return x, ok

    def _load_all(self, segs: list[_Seg], key: str, view: str, with_layers: bool) -> FeatureRows:
        parts = []
        for s in segs:
            gi = s.index.groups.get((key, view))
            if gi is not None and gi.n:
                if with_layers and not gi.has_layers:
                    raise CacheError(f"{self.path}: features {key}/{view} were extracted without --layers")
                parts.append((s, gi))
        if not parts:
            return FeatureRows([], np.zeros((0, 0), np.float32), None)
        k64 = np.concatenate([gi.keys.k64 for _, gi in parts])
        raw = np.concatenate([gi.keys.raw for _, gi in parts])
        order = np.concatenate([(np.int64(i) << 40) + gi.keys.row for i, (_, gi) in enumerate(parts)])
        first = unique_first(k64, raw, order)
        shas = raw_to_hex(raw[first])
        return self.load(key, view, shas=shas, with_layers=with_layers)

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
                found = {}
                r_sorted = np.unique(rows[sel])
                for r, m in zip(r_sorted, image_rows(s.file, r_sorted)):
                    found[int(r)] = m
                # rows of the same content repeated within one segment: fold each in file order
                for r in sorted(found):
                    m = found[r]
                    if m.sha256 in out:
                        out[m.sha256].merge(m)
                    else:
                        out[m.sha256] = m
                dup = _same_content_rows(s.index.images, k64[sel], raw[sel], rows[sel])
                for r in dup:
                    for m in image_rows(s.file, np.array([r])):
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

    def conflicts(self) -> list[dict]:
        """Images seen with disagreeing labels: dicts sha256, observations [(label, generator, path)]."""
        with self._session() as segs:
            recorded = [c for s in segs for c in s.index.conflicts]
        found: dict[str, list] = {}
        for sha, lab, gen, path in recorded:
            found.setdefault(sha, [])
            if (lab, gen, path) not in found[sha]:
                found[sha].append((lab, gen, path))
        groups = self.groups()
        live = set()
        for g in groups:
            lab = self.labelled(g.key, g.view)
            live.update(raw_to_hex(lab["raw"][lab["conflict"]]))
        missing = live - set(found)
        if missing:
            metas_by_seg = self._observations(sorted(missing))
            for sha, obs in metas_by_seg.items():
                found[sha] = obs
        return [{"sha256": s, "observations": found[s]} for s in sorted(found)]

    def index_labels(self, shas: list[str]) -> tuple[list[str], list[str]]:
        """Label and generator the index holds for each of `shas` (later segments win; '' if none)."""
        k64, raw = keys_of(shas)
        o = np.argsort(k64, kind="stable")  # sorted needles, once for every segment
        k64, raw = k64[o], raw[o]
        lab = [""] * len(shas)
        gen = [""] * len(shas)
        with self._session() as segs:
            for s in segs:
                rows = np.empty(len(o), np.int64)
                rows[o] = s.index.images.find(k64, raw)
                for j in np.flatnonzero(rows >= 0):
                    r = rows[j]
                    code = int(s.index.label[r])
                    if code:
                        lab[j] = LABELS[code]
                        gen[j] = s.index.vocab[int(s.index.gen[r])] if code == 2 else ""
        return lab, gen

    def stat_index(self):
        """The stat index next to this cache (see statindex.py)."""
        from .statindex import StatIndex

        return StatIndex(os.path.join(self.seg_dir, "stat.sqlite"), readonly=self.readonly)

    def conflicted(self, shas: Iterable[str]) -> set[str]:
        """Those of `shas` whose recorded labels disagree (index lookups only)."""
        from .conflicts import conflicted

        wanted = list(dict.fromkeys(shas))
        if not wanted:
            return set()
        k64, raw = keys_of(wanted)
        obs: list[list] = [[] for _ in wanted]
        out: set[str] = set()
        want_set = set(wanted)
        with self._session() as segs:
            for s in segs:
                t = s.index.images
                lo = np.searchsorted(t.k64, k64, side="left")
                hi = np.searchsorted(t.k64, k64, side="right")
                for j in np.flatnonzero(hi > lo):
                    for pos in range(lo[j], hi[j]):
                        if (t.raw[pos] == raw[j]).all():
                            r = t.row[pos]
                            obs[j].append((LABELS[s.index.label[r]], s.index.vocab[s.index.gen[r]]))
                out.update(c[0] for c in s.index.conflicts if c[0] in want_set)
        out.update(w for w, o in zip(wanted, obs) if conflicted(o))
        return out

    def _observations(self, shas: list[str]) -> dict[str, list]:
        k64, raw = keys_of(shas)
        out: dict[str, list] = {s: [] for s in shas}
        with self._session() as segs:
            for s in segs:
                t = s.index.images
                hits = np.flatnonzero(np.isin(t.k64, k64))
                if not len(hits):
                    continue
                for m in image_rows(s.file, np.sort(t.row[hits])):
                    if m.sha256 in out and m.label:
                        o = (m.label, m.generator, m.paths[-1] if m.paths else "")
                        if o not in out[m.sha256]:
                            out[m.sha256].append(o)
        return out

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

    def check_compatible(self, info, view: str, layers: Iterable[int]) -> None:
        """Refuse (CacheMismatchError) when (info.key, view) holds features made differently."""
        import json

        want = {"backbone": info.fingerprint(), "layers": list(layers)}
        with self._session() as segs:
            attrs = [s.index.groups[(info.key, view)].attrs for s in segs if (info.key, view) in s.index.groups]
        for a in attrs:
            b = json.loads(a["backbone"])
            have = {"backbone": {k: b.get(k) for k in ("arch", "weights_id", "preprocess")},
                    "layers": list(json.loads(a["layers"]))}
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
            self.compact(wait=False)
        return final

    def _update_catalogue(self, add: list[str] = (), replace: tuple[list[str], str] | None = None) -> list[str]:
        """Under the exclusive lock: upgrade a v1 cache, adopt orphan segments of dead writers, set aside
        damaged ones, append `add`, or swap `replace` = (inputs, output). Returns the new segment list."""
        with flock(self.lock_path, exclusive=True, create_dir=True):
            cat = catalogue.read(self.path)
            segs = self._upgrade_in_place(cat) if cat.legacy else list(cat.segments)
            segs += [p for p in self._orphans(segs) if p not in add]
            if replace is not None:
                inputs, output = replace
                at = segs.index(inputs[0])
                segs = segs[:at] + [output] + [s for s in segs[at:] if s not in inputs]
            segs += list(add)
            catalogue.write(self.path, segs, cat.generation + 1)
            if replace is not None:
                for s in replace[0]:
                    with contextlib.suppress(OSError):
                        os.remove(s)
            return segs

    def _upgrade_in_place(self, cat) -> list[str]:
        """v1 → v2 without copying: hard-link the main file and shards into the segment folder."""
        os.makedirs(self.seg_dir, exist_ok=True)
        out = []
        for src in cat.segments:
            base = "seg-00000000000000000000-0-v1main.h5" if src == self.path else "seg-" + os.path.basename(src)
            dst = os.path.join(self.seg_dir, base)
            if not os.path.exists(dst):
                try:
                    os.link(src, dst)
                except OSError:
                    import shutil

                    shutil.copyfile(src, dst + ".tmp")
                    os.replace(dst + ".tmp", dst)
            out.append(dst)
        fsync_dir(self.seg_dir)
        return out

    def _scan_orphans(self, live: list[str]) -> tuple[list[str], list[str]]:
        """(segments of dead writers missing from the catalogue, leftovers of dead processes: merge
        outputs and temp files)."""
        if not os.path.isdir(self.seg_dir):
            return [], []
        live_set, adopt, junk = set(live), [], []
        for n in sorted(os.listdir(self.seg_dir)):
            p = os.path.join(self.seg_dir, n)
            parts = n.lstrip(".").split("-")
            if n.startswith("seg-") and n.endswith(".h5") and p not in live_set:
                if len(parts) >= 3 and parts[2].isdigit() and not pid_alive(int(parts[2])):
                    adopt.append(p)
            elif n.startswith("mrg-") and len(parts) >= 2 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                junk.append(p)
            elif n.endswith(".tmp"):
                pid = n.rsplit(".", 2)[-2] if n.count(".") >= 2 else ""
                if pid.isdigit() and not pid_alive(int(pid)):
                    junk.append(p)
        return adopt, junk

    def _orphans(self, live: list[str]) -> list[str]:
        """Adopt segments of killed writers (killed between writing and the catalogue update); remove
        dead processes' merge outputs and temp files; set aside damaged orphans as *.bad."""
        import h5py

        adopt, junk = self._scan_orphans(live)
        for p in junk:
            with contextlib.suppress(OSError):
                os.remove(p)
        good = []
        for p in adopt:
            try:
                with h5py.File(p, "r") as f:
                    check_header(f, p)
                good.append(p)
            except (OSError, CacheError):
                with contextlib.suppress(OSError):
                    os.replace(p, p + ".bad")
                self._warn(f"{p}: unreadable cache segment set aside as {os.path.basename(p)}.bad")
        return good

    def compact(self, full: bool = False, wait: bool = True) -> int:
        """Run tiered merges (or merge everything with `full`); returns how many segments were merged.
        Only one process merges at a time; with wait=False a busy merger makes this return 0 at once."""
        from . import merge

        if self.readonly:
            return 0
        os.makedirs(self.seg_dir, exist_ok=True)
        if full and catalogue.read(self.path).legacy:
            return self._upgrade_full()
        merged = 0
        lock = flock(self.merge_lock_path, exclusive=True) if wait else try_flock(self.merge_lock_path)
        with lock as held:
            if held is False and not wait:
                return 0
            segs = self._update_catalogue()
            while True:
                sizes = []
                for s in segs:
                    try:
                        sizes.append(os.path.getsize(s))
                    except OSError:
                        sizes.append(0)
                run = merge.plan(sizes, full=full)
                if run is None:
                    break
                inputs = segs[run[0]:run[1]]
                inputs, bad = self._openable(inputs)
                if bad:
                    segs = self._set_aside(bad)
                    continue
                out = self._merge(inputs)
                final = os.path.join(self.seg_dir, f"seg-{time.time_ns():020d}-{os.getpid()}-m{merged:05d}.h5")
                os.replace(out, final)
                segs = self._update_catalogue(replace=(inputs, final))
                merged += len(inputs)
                if full:
                    break
        with contextlib.suppress(OSError):
            os.rmdir(self.pending_dir)
        return merged

    def _upgrade_full(self) -> int:
        """v1 → one v2 segment: merge the v1 file and shards into a new segment, then replace the v1
        file by the catalogue in one rename. Any failure before that leaves the v1 file untouched."""
        with flock(self.merge_lock_path, exclusive=True):
            cat = catalogue.read(self.path)
            if not cat.legacy:  # another process upgraded it meanwhile
                return 0
            out = self._merge(cat.segments)
            final = os.path.join(self.seg_dir, f"seg-{time.time_ns():020d}-{os.getpid()}-u00000.h5")
            with flock(self.lock_path, exclusive=True, create_dir=True):
                os.replace(out, final)
                catalogue.write(self.path, [final], 1)
                for s in cat.segments[1:]:
                    with contextlib.suppress(OSError):
                        os.remove(s)
            with contextlib.suppress(OSError):
                os.rmdir(self.pending_dir)
            return len(cat.segments)

    def _merge(self, inputs: list[str]) -> str:
        """Merge `inputs` into a new mrg- file (removed again on any failure); returns its path."""
        import h5py

        from .merge import merge_files

        out = os.path.join(self.seg_dir, f"mrg-{os.getpid()}-{time.time_ns():020d}.h5")
        files = []
        try:
            files = [h5py.File(p, "r") for p in inputs]
            merge_files(files, out)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.remove(out)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(os_error_message(out, e)) from None
            raise
        finally:
            for f in files:
                f.close()
        return out

    def _openable(self, paths: list[str]) -> tuple[list[str], list[str]]:
        import h5py

        good, bad = [], []
        for p in paths:
            try:
                with h5py.File(p, "r") as f:
                    check_header(f, p)
                    for key, view in feature_groups(f):
                        f[f"features/{key}/{view}/sha256"][()]
                good.append(p)
            except CacheError:
                raise
            except Exception:  # noqa: BLE001
                bad.append(p)
        return good, bad

    def _set_aside(self, bad: list[str]) -> list[str]:
        """Rename damaged segments to *.bad (never deleted) and drop them from the catalogue."""
        with flock(self.lock_path, exclusive=True, create_dir=True):
            cat = catalogue.read(self.path)
            segs = [s for s in cat.segments if s not in bad]
            catalogue.write(self.path, segs, cat.generation + 1)
        for s in bad:
            with contextlib.suppress(OSError):
                os.replace(s, s + ".bad")
            self._warn(f"{s}: unreadable cache segment set aside as {os.path.basename(s)}.bad")
        return segs

    def shard_count(self) -> int:
        """Segments a tiered merge would combine now (0 when the cache needs no merging)."""
        from . import merge

        segs = self.segments()
        sizes = [os.path.getsize(s) if os.path.exists(s) else 0 for s in segs]
        run = merge.plan(sizes)
        legacy = catalogue.read(self.path).legacy
        return (run[1] - run[0] if run else 0) + (len(segs) if legacy and len(segs) > 1 else 0)

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
                    "images": g.count, "labels": dict(sorted(by_label.items())),
                    "generators": dict(sorted(by_gen.items())),
                })
        return {
            "path": self.path, "format_version": 1 if cat.legacy else 2, "size_bytes": size,
            "segments": len(cat.segments), "pending_shards": self.shard_count() if cat.segments else 0,
            "images": n_images, "errors": n_errors, "conflicts": n_conflicts, "features": feats,
        }


def _aligned_labels(segs: list, key: str, view: str) -> dict | None:
    """labelled() for the usual cache, or None: every segment holds images and features of the same
    images (as extract, import and merges write them), and no image is in two segments. Labels are
    then read straight from each segment, with no join and no resolution."""
    parts, code = [], {"": 0}
    for i, s in enumerate(segs):
        idx = s.index
        gi = idx.groups.get((key, view))
        t = idx.images
        if gi is None:
            if len(t):
                return None  # metadata-only segment (labels added later): resolve the general way
            continue
        g = gi.keys
        if len(g) != len(t) or not np.array_equal(g.k64, t.k64) or not np.array_equal(g.raw, t.raw) or \
                idx.conflicts:
            return None
        remap = np.array([code.setdefault(v, len(code)) for v in idx.vocab], np.int32)
        parts.append((g.k64, g.raw, (np.int64(i) << 40) + g.row, idx.label[t.row], remap[idx.gen[t.row]]))
    if not parts:
        return None
    k64 = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    srt = np.sort(k64, kind="stable")
    if (srt[1:] == srt[:-1]).any():
        return None  # an image in two segments (or twice in one): resolve the general way
    order = np.concatenate([p[2] for p in parts])
    o = np.argsort(order, kind="stable")
    cat = (lambda j: parts[0][j]) if len(parts) == 1 else (lambda j: np.concatenate([p[j] for p in parts]))
    lab, gen = cat(3), cat(4)
    gen = np.where(lab == 2, gen, 0)
    return {"raw": cat(1)[o], "label": lab[o].astype(np.int8), "gen": gen[o].astype(np.int32),
            "conflict": np.zeros(len(o), bool), "vocab": [v for v, _ in sorted(code.items(), key=lambda t: t[1])]}


def _distinct_oldest(tabs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct keys of a group's per-segment tables [(segment position, KeyTable)], the oldest row
    of each: (k64, raw, order) in key order, order = segment << 40 | row."""
    if not tabs:
        return np.zeros(0, np.uint64), np.zeros((0, 32), np.uint8), np.zeros(0, np.int64)
    if len(tabs) == 1 and not (tabs[0][1].k64[1:] == tabs[0][1].k64[:-1]).any():
        i, t = tabs[0]
        return t.k64, t.raw, (np.int64(i) << 40) + t.row
    k64 = np.concatenate([t.k64 for _, t in tabs])
    raw = np.concatenate([t.raw for _, t in tabs])
    order = np.concatenate([(np.int64(i) << 40) + t.row for i, t in tabs])
    perm, starts = group_ids(k64, raw, order)
    first = perm[starts]  # in key order
    return k64[first], raw[first], order[first]


def _resolve_labels(parts: list) -> tuple[KeyTable, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct image (a KeyTable in key order): the last label, the generator that goes with it,
    and whether observations disagree. `parts`: [(segment position, images KeyTable, label codes,
    generator codes)] oldest first, each in its table's key order."""
    from .conflicts import conflict_mask

    if len(parts) == 1 and not (parts[0][1].k64[1:] == parts[0][1].k64[:-1]).any():
        _, t, lab, gen = parts[0]
        return KeyTable(t.k64, t.raw, np.arange(len(t), dtype=np.int64)), lab, gen, np.zeros(len(t), bool)
    ik = np.concatenate([p[1].k64 for p in parts])
    ir = np.concatenate([p[1].raw for p in parts])
    il = np.concatenate([p[2] for p in parts])
    ig = np.concatenate([p[3] for p in parts])
    io_ = np.concatenate([(np.int64(i) << 40) + t.row for i, t, _, _ in parts])
    perm, starts = group_ids(ik, ir, io_)
    if len(starts) == len(perm):  # every image seen once: nothing to resolve
        return KeyTable(ik[perm], ir[perm], np.arange(len(perm), dtype=np.int64)), il[perm], ig[perm], \
            np.zeros(len(perm), bool)
    lab, gen = il[perm], ig[perm]
    pos = np.arange(len(perm))
    last_lab = np.maximum.reduceat(np.where(lab > 0, pos, -1), starts)
    last_gen = np.maximum.reduceat(np.where((gen > 0) | (lab == 1), pos, -1), starts)
    u_lab = np.where(last_lab >= 0, lab[np.maximum(last_lab, 0)], 0).astype(np.int8)
    u_gen = np.where(last_gen >= 0, gen[np.maximum(last_gen, 0)], 0).astype(np.int32)
    u_con = conflict_mask(il, ig, perm, starts)
    first = perm[starts]
    return KeyTable(ik[first], ir[first], np.arange(len(starts), dtype=np.int64)), u_lab, u_gen, u_con


def _without(t: KeyTable, bad: KeyTable) -> KeyTable:
    """`t` without the keys in `bad` (a copy only when something is removed)."""
    drop = bad.find(t.k64, t.raw) >= 0
    if not drop.any():
        return t
    keep = ~drop
    return KeyTable(t.k64[keep], t.raw[keep], None if t.row is None else t.row[keep])


def _sorted(k64: np.ndarray, raw: np.ndarray):
    o = np.argsort(k64, kind="stable")
    return k64[o], raw[o], np.arange(len(o), dtype=np.int64)


def _same_content_rows(table: KeyTable, k64: np.ndarray, raw: np.ndarray, first_rows: np.ndarray) -> list[int]:
    """Further rows (after the first) of the same content within one segment's images table."""
    out = []
    lo = np.searchsorted(table.k64, k64, side="left")
    hi = np.searchsorted(table.k64, k64, side="right")
    for a, b, r0, rw in zip(lo, hi, first_rows, raw):
        if b - a > 1:
            for j in range(a, b):
                r = int(table.row[j])
                if r != int(r0) and (table.raw[j] == rw).all():
                    out.append(r)
    return sorted(out)
