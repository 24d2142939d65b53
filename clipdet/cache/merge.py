"""Tiered (LSM-style) merging of segments: small segments merge into bigger ones; a big segment is
never rewritten to add a few rows.

A segment's tier is log8 of its size in units of 1 MiB; a run of FANOUT adjacent segments of the
same tier merges into one segment of the next tier, so every row is rewritten O(log N) times in all.
Merging keeps the cache's order (inputs are contiguous, outputs take their place): for features,
the first-written row of an image wins; image metadata is folded, later observations winning.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import CacheMismatchError
from .files import check_free_space
from .index import group_ids, hex_to_raw, raw_to_k64
from .model import OPTIONAL_EXTRAS, ImageMeta
from .segment import (
    create_feature_datasets,
    errors_table,
    feature_groups,
    group_attrs,
    group_extras,
    group_heads,
    group_rows_checked,
    write_errors,
    write_header,
    write_images,
)

FANOUT = 8
TIER_UNIT = 2**20
COPY_ROWS = 1 << 15


def tier(size: int) -> int:
    """Tier of a segment of `size` bytes (0 below 1 MiB, +1 per factor FANOUT)."""
    return 0 if size < TIER_UNIT else 1 + int(math.log(size / TIER_UNIT, FANOUT))


def plan(sizes: list[int], full: bool = False) -> tuple[int, int] | None:
    """The next run [start, end) of adjacent segments to merge, or None. `full`: everything into one.

    Lowest tier first: the first window of adjacent segments of tier <= T that holds FANOUT segments
    of tier T (smaller ones inside it are merged along, so a stray small batch never blocks a merge).
    Merging only adjacent segments keeps the cache's order: the oldest row of an image still wins."""
    if full:
        return (0, len(sizes)) if len(sizes) > 1 else None
    tiers = [tier(s) for s in sizes]
    for t in sorted(set(tiers)):
        i = 0
        while i < len(tiers):
            if tiers[i] > t:
                i += 1
                continue
            j, count = i, 0
            while j < len(tiers) and tiers[j] <= t:
                count += tiers[j] == t
                j += 1
                if count >= FANOUT:
                    return i, j
            i = j
    return None


def merge_files(files: list, out_path: str, replaces: list[str] = ()) -> int:
    """Write the union of the open segment files `files` (oldest first) to `out_path` (a new file);
    returns how many damaged feature rows were left out. The output records the segments it replaces
    (attr `replaces`, file names) and the cache position of the first (attr `order_ns`), so a cache
    whose catalogue is lost can be rebuilt from its segment files (catalogue.rebuild)."""
    import h5py

    from .segment import order_ns

    need = sum(os.path.getsize(f.filename) for f in files if os.path.exists(f.filename))
    check_free_space(os.path.dirname(os.path.abspath(out_path)), need)
    with h5py.File(out_path, "w") as out:
        write_header(out)
        out.attrs["replaces"] = json.dumps([os.path.basename(p) for p in replaces])
        if files:
            out.attrs["order_ns"] = order_ns(files[0], files[0].filename)
        _merge_images(files, out)
        errors, seen = [], set()
        for f in files:
            for e in errors_table(f):
                if (e["path"], e["reason"]) not in seen:
                    seen.add((e["path"], e["reason"]))
                    errors.append(e)
        write_errors(out, errors)
        fg = out.create_group("features")
        groups: dict[tuple[str, str], list] = {}
        for f in files:
            for key, view in feature_groups(f):
                groups.setdefault((key, view), []).append(f[f"features/{key}/{view}"])
        dropped = 0
        for (key, view), srcs in groups.items():
            dropped += _merge_group(srcs, fg.require_group(key).create_group(view), key, view)
    from .files import fsync

    with open(out_path, "rb") as fh:
        fsync(fh.fileno())
    return dropped


def _image_columns(f, vocab_code: dict) -> dict:
    """One file's /images table as columns, generators recoded into the shared `vocab_code`."""
    from .model import decode
    from .segment import image_columns

    c = image_columns(f)
    remap = np.array([vocab_code.setdefault(v, len(vocab_code)) for v in c["vocab"]], np.int32)
    g = f["images"]
    out = {"sha256": c["sha256"], "label": c["label"], "gen": remap[c["gen"]] if len(c["gen"]) else c["gen"],
           "width": g["width"][()], "height": g["height"][()],
           "format": np.array(decode(g["format"][()]), dtype=object),
           "paths": np.array(decode(g["paths"][()]), dtype=object)}
    bad = hash_mismatches(g, c["sha256"])
    if len(bad):  # a damaged hash: that row's metadata belongs to no known image
        keep = np.ones(len(c["sha256"]), bool)
        keep[bad] = False
        out = {k: v[keep] for k, v in out.items()}
    return out


def hash_mismatches(g, column: np.ndarray) -> np.ndarray:
    """Rows of table `g` (images or a feature group) whose sha256 `column` value differs from the digest
    its stored search index gives that row: a damaged hash. Empty when the index is absent or itself
    damaged (then the column is all there is)."""
    from .index import KeyTable

    tab = KeyTable.load(g, len(column))
    if tab is None or tab.damage() is not None:
        return np.zeros(0, np.int64)
    return tab.mismatched_rows(column)


def _merge_images(files: list, out) -> None:
    """Images: distinct content is copied column-wise; repeated content is folded (later observations
    win, ImageMeta.merge), and disagreeing labels are kept in /images/conflicts."""
    from .conflicts import conflicted, read_conflicts, write_conflicts
    from .model import LABELS

    vocab_code: dict[str, int] = {"": 0}
    parts = [_image_columns(f, vocab_code) for f in files if f.get("images") is not None and len(f["images/sha256"])]
    vocab = [v for v, _ in sorted(vocab_code.items(), key=lambda t: t[1])]
    if not parts:
        write_images(out, np.zeros(0, "S64"), np.zeros(0, np.int8), np.zeros(0, np.int32), [""],
                     np.zeros(0, np.int32), np.zeros(0, np.int32), [], [])
        write_conflicts(out, read_conflicts(files))
        return
    col = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    raw = hex_to_raw(col["sha256"])
    perm, starts = group_ids(raw_to_k64(raw), raw, np.arange(len(raw)))
    counts = np.diff(np.append(starts, len(perm)))
    first = perm[starts]
    label, gen = col["label"][first].copy(), col["gen"][first].copy()
    width, height = col["width"][first].copy(), col["height"][first].copy()
    fmt, paths = col["format"][first].copy(), col["paths"][first].copy()
    recorded = read_conflicts(files)
    for gi in np.flatnonzero(counts > 1):  # only repeated content goes through Python objects
        idx = np.sort(perm[starts[gi]:starts[gi] + counts[gi]])
        metas = [ImageMeta(col["sha256"][i].decode(), LABELS[col["label"][i]], vocab[col["gen"][i]],
                           int(col["width"][i]), int(col["height"][i]), col["format"][i],
                           [p for p in col["paths"][i].split("\n") if p]) for i in idx]
        obs = [(o.label, o.generator) for o in metas]
        if conflicted(obs):
            recorded += [(o.sha256, o.label, o.generator, o.paths[0] if o.paths else "") for o in metas if o.label]
        m = ImageMeta(metas[0].sha256, metas[0].label, metas[0].generator, metas[0].width, metas[0].height,
                      metas[0].format, list(metas[0].paths))
        for o in metas[1:]:
            m.merge(o)
        label[gi] = LABELS.index(m.label) if m.label in LABELS else 0
        gen[gi] = vocab_code.setdefault(m.generator, len(vocab_code))
        width[gi], height[gi], fmt[gi], paths[gi] = m.width, m.height, m.format, "\n".join(m.paths)
    vocab = [v for v, _ in sorted(vocab_code.items(), key=lambda t: t[1])]
    pos = np.argsort(first, kind="stable")  # first-occurrence order: the cache's order is kept
    write_images(out, col["sha256"][first][pos], label[pos], gen[pos], vocab, width[pos], height[pos],
                 list(fmt[pos]), list(paths[pos]))
    write_conflicts(out, recorded)


def _merge_group(srcs: list, g, key: str, view: str) -> int:
    """Copy the distinct rows of one feature group; the oldest *whole* row of an image wins and damaged
    rows are left out (their images are re-extracted by the next run that meets them). Returns how many
    damaged rows were dropped."""
    from .index import KeyTable, group_ids

    first = srcs[0]

    def layout(g):
        return (json.loads(g.attrs["backbone"]).get("weights_id"), g.attrs["layers"], int(g.attrs["dim"]),
                group_heads(g.attrs), tuple(x for x in group_extras(g) if x not in OPTIONAL_EXTRAS))

    ref = layout(first)
    # optional extras (patch-token means) are kept only when every source holds them
    extras = tuple(x for x in group_extras(first) if x not in OPTIONAL_EXTRAS or all(x in src for src in srcs))
    for src in srcs:
        if layout(src) != ref:
            raise CacheMismatchError(f"{src.file.filename}: features for {key}/{view} do not match the cache's; "
                                     "move that segment away to compact")
    group_attrs(g, {k: first.attrs[k] for k in first.attrs})
    shas = [s["sha256"][()] for s in srcs]
    allsha = np.concatenate(shas) if shas else np.zeros(0, "S64")
    raw = hex_to_raw(allsha)
    perm, starts = group_ids(raw_to_k64(raw), raw, np.arange(len(allsha)))
    counts = np.diff(np.append(starts, len(perm)))
    keep = np.zeros(len(allsha), bool)
    keep[perm[starts[counts == 1]]] = True
    offsets = np.cumsum([0] + [len(s) for s in shas])
    hashbad = np.zeros(len(allsha), bool)
    for si, (src, s) in enumerate(zip(srcs, shas)):
        hashbad[offsets[si] + hash_mismatches(src, s)] = True
    dropped = int(hashbad.sum())
    keep &= ~hashbad
    for gi in np.flatnonzero(counts > 1):  # an image in several rows: the oldest whole one wins
        members = np.sort(perm[starts[gi]:starts[gi] + counts[gi]])
        members = members[~hashbad[members]]
        if not len(members):
            continue
        chosen = members[0]
        for mbr in members:
            si = int(np.searchsorted(offsets, mbr, side="right") - 1)
            if group_rows_checked(srcs[si], np.array([mbr - offsets[si]]), extras)[1][0]:
                chosen = mbr
                break
        keep[chosen] = True
    dim = int(first.attrs["dim"])
    ds_s, ds_e, ds_x = create_feature_datasets(g, int(keep.sum()), dim, {x: first[x].shape[1:] for x in extras})
    written, m = [], 0
    for si, (src, s) in enumerate(zip(srcs, shas)):
        n = len(s)
        for start in range(0, n, COPY_ROWS):
            k = keep[offsets[si] + start: offsets[si] + min(n, start + COPY_ROWS)]
            rows = start + np.flatnonzero(k)
            if not len(rows):
                continue
            e, ok, xv = group_rows_checked(src, rows, extras)
            dropped += int((~ok).sum())
            c = int(ok.sum())
            if not c:
                continue
            written.append(s[rows[ok]])
            ds_s[m:m + c] = s[rows[ok]]
            ds_e[m:m + c] = e[ok]
            for name, ds in ds_x.items():
                ds[m:m + c] = xv[name][ok]
            m += c
    for ds in (ds_s, ds_e, *ds_x.values()):
        if ds.shape[0] != m:
            ds.resize(m, axis=0)
    KeyTable.build(np.concatenate(written) if written else np.zeros(0, "S64")).save(g)
    return dropped
