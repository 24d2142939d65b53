"""Labels from the index: each image's resolved label and generator, conflicting labels.

A mixin of FeatureCache (store.py): everything here reads the in-memory index only, never rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .index import KeyTable, group_ids, keys_of, raw_to_hex, sorted_keys
from .model import LABELS
from .segment import image_rows


class LabelsMixin:
    """FeatureCache methods about labels: labelled(), index_labels(), conflicted(), conflicts()."""

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
            conflict |= KeyTable(*sorted_keys(rk, rr)).find(gk, graw) >= 0
        o = np.argsort(gorder, kind="stable")  # cache order: oldest segment first, file order within
        return {"raw": graw[o], "label": label[o], "gen": gen[o], "conflict": conflict[o], "vocab": vocab}

    def conflicts(self) -> list[dict]:
        """Images seen with disagreeing labels: dicts sha256, observations [(label, generator, path)]."""
        with self._session() as segs:
            recorded = [c for s in segs for c in s.index.conflicts]
        found: dict[str, list] = {}
        for sha, lab, gen, path in recorded:
            found.setdefault(sha, [])
            if (lab, gen, path) not in found[sha]:
                found[sha].append((lab, gen, path))
        groups = self.groups(count=False)
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
