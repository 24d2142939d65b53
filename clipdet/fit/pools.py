"""Reference pools: labelled cached features, read from the cache's index or extracted from paths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..detectors.features import HINTS, KINDS, load_kwargs, matrix, select_units
from ..errors import CacheError, UsageError
from .shots import draw_shots


@dataclass
class Pool:
    """Labelled candidate references: hashes, labels ('real'/'fake'), generators, first paths, features."""

    sha256: list[str]
    label: list[str]
    generator: list[str]
    path: list[str]
    X: np.ndarray
    #: other feature kinds (clipdet.detectors.features: "heads", "layers") → (flat matrix aligned with X, its layout)
    feats: dict = field(default_factory=dict)

    def take(self, idx: Sequence[int]) -> Pool:
        """The sub-pool at `idx`."""
        idx = list(idx)
        return Pool([self.sha256[i] for i in idx], [self.label[i] for i in idx], [self.generator[i] for i in idx],
                    [self.path[i] for i in idx], self.X[idx], {k: (m[idx], lay) for k, (m, lay) in self.feats.items()})

    def matrix(self, kind: str = "embedding", blocks=None) -> tuple[np.ndarray, dict]:
        """(features of `kind` as a flat matrix, their layout); UsageError when the pool lacks them.
        `blocks` (block kinds only): a `parse_blocks` selector or absolute block indices to keep."""
        if kind == "embedding":
            return self.X, {"kind": "embedding", "units": 1, "dim": int(self.X.shape[1]) if self.X.ndim == 2 else 0}
        if kind == "layers_both" and kind not in self.feats and {"layers", "layers_mean"} <= set(self.feats):
            (a, la), (b, _) = self.feats["layers"], self.feats["layers_mean"]
            self.feats[kind] = (np.hstack([a, b]), dict(la, kind=kind, units=2 * int(la["units"])))
        if kind not in self.feats:
            raise UsageError(f"these references have no {kind!r} features; {HINTS.get(kind, '')}")
        if blocks is None:
            return self.feats[kind]
        return select_units(*self.feats[kind], blocks)

    def __len__(self) -> int:
        return len(self.sha256)

    @property
    def y(self) -> np.ndarray:
        """1 for fake, 0 for real."""
        return np.array([1 if lab == "fake" else 0 for lab in self.label], dtype=np.int64)


def need_both_classes(pool: Pool, what: str) -> None:
    y = pool.y
    if len(pool) == 0 or y.min() == y.max():
        have = {lab: pool.label.count(lab) for lab in ("real", "fake")}
        raise UsageError(
            f"{what} needs labelled real and fake images; found real {have['real']}, fake {have['fake']} "
            "(label by layout real/** and fake/<generator>/**, or --manifest)"
        )


def need_undamaged(cache, pool: Pool, damaged: set[str], what: str = "references") -> None:
    """Refuse, naming the cure, when rows found damaged on reading left `pool` without one class: 'found
    real 0, fake 0' would hide that the cache holds the images (`cache info` counts them)."""
    y = pool.y
    if not damaged or (len(pool) and y.min() != y.max()):
        return
    have = {lab: pool.label.count(lab) for lab in ("real", "fake")}
    raise CacheError(
        f"{cache.path}: {len(damaged)} cached row(s) of the {what} are damaged (their features failed the checks "
        f"on reading), leaving real {have['real']}, fake {have['fake']}; run clipdet cache verify --repair, "
        "then clipdet extract the images again (or fit PATH, which re-embeds them)"
    )


def resolve_backbone_key(cache, backbone: str | None, view: str = "clean") -> tuple[str, dict]:
    """The cache group key and backbone record for `backbone` (or the cache's only backbone)."""
    groups = [g for g in cache.groups(count=False) if g.view == view]
    if backbone:
        from ..backbones import describe_backbone

        key = describe_backbone(backbone).key
        for g in groups:
            if g.key == key:
                return key, g.backbone
        have = sorted({g.backbone.get("spec", g.key) for g in groups})
        raise UsageError(
            f"{cache.path}: no '{view}' features for backbone {backbone}"
            + (f" (cache has: {', '.join(have)})" if have else " (cache is empty)")
            + "; pass PATHs to extract them or run clipdet extract"
        )
    keys = sorted({g.key for g in groups})
    if len(keys) == 1:
        g = next(g for g in groups if g.key == keys[0])
        return g.key, g.backbone
    if not keys:
        raise UsageError(f"{cache.path}: no '{view}' features cached; run clipdet extract first (or pass PATHs)")
    raise UsageError(f"{cache.path} holds several backbones ({', '.join(keys)}); choose one with --backbone")


def load_pool(cache, key: str, view: str, shas: Iterable[str] | None = None,
              labels: dict[str, tuple[str, str]] | None = None, paths: dict[str, str] | None = None,
              kinds: Sequence[str] = ("embedding",)) -> Pool:
    """Labelled cached features of (key, view); labels/paths from the arguments, else cache metadata.

    Without `shas`, every image of the group is read: for whole-cache tools on small caches. `fit`
    samples from the index instead (`sample_from_cache`) and reads only the chosen rows. `kinds`
    beyond "embedding" (clipdet.detectors.features: "heads", "layers") are loaded into `Pool.feats`."""
    others = [k for k in kinds if k != "embedding"]
    layouts = {k: group_layout(cache, key, view, k) for k in others}
    rows = cache.load(key, view, shas=shas, **load_kwargs(others))
    need = [s for s in rows.sha256 if labels is None or s not in labels or not (paths or {}).get(s)]
    images = cache.image_metas(need) if need else {}
    out_s, out_l, out_g, out_p, keep = [], [], [], [], []
    for i, s in enumerate(rows.sha256):
        if labels is not None and s in labels:
            lab, gen = labels[s]
        else:
            m = images.get(s)
            lab, gen = (m.label, m.generator) if m else ("", "")
        if lab not in ("real", "fake"):
            continue
        m = images.get(s)
        p = (paths or {}).get(s) or (m.paths[0] if m and m.paths else "")
        out_s.append(s)
        out_l.append(lab)
        out_g.append(gen or "" if lab == "fake" else "")
        out_p.append(p)
        keep.append(i)
    X = rows.embedding[keep] if keep else np.zeros((0, rows.embedding.shape[1] if rows.embedding.ndim == 2 else 0),
                                                   np.float32)
    feats = {}
    for k in others:
        m = matrix(rows, k, keep) if keep else np.zeros((0, 0), np.float32)
        feats[k] = (m, dict(layouts[k], dim=layouts[k].get("dim") or m.shape[1] // max(1, layouts[k]["units"])))
    return Pool(out_s, out_l, out_g, out_p, X, feats)


def sample_from_cache(cache, key: str, view: str, k: int | None, seed: int, per_generator: bool = False,
                      excluded: set[str] = frozenset(), kinds: Sequence[str] = ("embedding",)) -> tuple[Pool, dict]:
    """Draw the shots from the cache's index (no per-image objects) and read only their rows.

    Candidates are the group's images labelled real or fake, without conflicting labels (warned) or
    an excluded generator. The draw equals `sample_shots` over the same candidates. Returns the
    chosen pool (cache order) and the candidate counts per class."""
    import warnings

    from ..cache.index import hex_order, raw_to_hex

    cand = cache.labelled(key, view)
    lab, conflict, gcode = cand["label"], cand["conflict"], cand["gen"]
    vocab = cand["vocab"]
    mask = (lab == 1) | (lab == 2)
    n_conf = int((mask & conflict).sum())
    if n_conf:
        warnings.warn(f"{cache.path}: {n_conf} image(s) with conflicting labels left out of the references "
                      "(clipdet cache conflicts lists them)", stacklevel=2)
        mask &= ~conflict
    if excluded:
        have = {vocab[c] for c in np.unique(gcode[mask & (lab == 2)])} - {""}
        unknown = set(excluded) - have
        if unknown:
            raise UsageError(f"--exclude-generator {', '.join(sorted(unknown))}: no such generator among the "
                             f"references (have: {', '.join(sorted(have))})")
        drop = [c for c, v in enumerate(vocab) if v in excluded]
        mask &= ~((lab == 2) & np.isin(gcode, drop))
    idx = np.flatnonzero(mask)
    is_real, is_fake = lab[idx] == 1, lab[idx] == 2
    per_gen: dict[str, int] = {}
    for c, n in zip(*np.unique(gcode[idx][is_fake], return_counts=True)):
        per_gen[vocab[c] or "unknown"] = per_gen.get(vocab[c] or "unknown", 0) + int(n)
    counts = {"real": int(is_real.sum()), "fake": int(is_fake.sum()), "generators": per_gen}
    if not counts["real"] or not counts["fake"]:
        need_both_classes(Pool([], ["real"] * counts["real"] + ["fake"] * counts["fake"], [], [],
                                np.zeros((0, 0))), "fit")
    names = [v or "unknown" for v in vocab]
    damaged: set[str] = set()
    for _ in range(8):  # a drawn row found damaged on reading leaves the candidates; draw again
        order = hex_order(cand["raw"][idx])
        pick = idx[draw_shots(order, lab[idx] == 1, lab[idx] == 2, gcode[idx], names, k, seed, per_generator)]
        shas = raw_to_hex(cand["raw"][pick])
        labels = {s: ("real" if lab[i] == 1 else "fake", vocab[gcode[i]] if lab[i] == 2 else "")
                  for s, i in zip(shas, pick)}
        chosen = load_pool(cache, key, view, shas=shas, labels=labels, kinds=kinds)
        if len(chosen) == len(shas):
            break
        bad = set(shas) - set(chosen.sha256)
        damaged |= bad
        idx = np.array([i for i, s in zip(idx, raw_to_hex(cand["raw"][idx])) if s not in bad], dtype=np.int64)
    need_undamaged(cache, chosen, damaged)
    return chosen, counts


def drop_conflicts(labels: dict, seen_as: dict[str, list], cache=None) -> set[str]:
    """Remove from `labels` the images whose labels disagree, among these inputs (`seen_as`: sha →
    [(label, generator, path)]) or in the cache's record; warns naming the files. Returns them."""
    import warnings

    from ..cache.conflicts import conflicted

    bad = {s for s, obs in seen_as.items() if conflicted([(lab, g) for lab, g, _ in obs])}
    for s in sorted(bad):
        desc = "; ".join(f"{p} as {lab}{'/' + g if g else ''}" for lab, g, p in seen_as[s])
        warnings.warn(f"conflicting labels for the same image ({desc}): left out", stacklevel=3)
    if cache is not None and labels:
        recorded = cache.conflicted(list(labels)) - bad
        if recorded:
            first = sorted(recorded)[0]
            warnings.warn(f"{len(recorded)} image(s) relabelled against the cache's record, e.g. "
                          f"{seen_as.get(first, [('', '', first)])[0][2]}: left out (clipdet cache conflicts "
                          "lists them)", stacklevel=3)
        bad |= recorded
    for s in bad:
        labels.pop(s, None)
    return bad


def pool_from_refs(refs, cache, backbone: str, view: str, views_to_extract: Sequence[str], device: str,
                   quiet: bool = True, kinds: Sequence[str] = ("embedding",), references: bool = True):
    """Extract what the cache lacks for `refs`, then load them as a labelled pool (labels from refs).

    `references=False` (--calibrate images): new images are recorded in the cache without their
    labels, so a later `fit` never draws them as references; the pool still has the refs' labels."""
    from ..extract.discover import without_labels
    from ..extract.run import extract

    summary = extract(refs if references else without_labels(refs), backbone, cache=cache,
                      views=list(views_to_extract), device=device, quiet=quiet)
    by_path = {r.path: r for r in refs}
    labels, paths = {}, {}
    seen_as: dict[str, list] = {}
    for path, sha, error in summary.records:  # hashes from the extraction pass: no second read
        r = by_path[path]
        if error or r.label not in ("real", "fake"):
            continue
        labels[sha] = (r.label, r.generator or "")
        paths.setdefault(sha, r.path)
        seen_as.setdefault(sha, []).append((r.label, r.generator or "", r.path))
    drop_conflicts(labels, seen_as, cache)
    key, rec = resolve_backbone_key(cache, backbone, view)
    pool = load_pool(cache, key, view, shas=sorted(labels), labels=labels, paths=paths, kinds=kinds)
    need_undamaged(cache, pool, cache.damaged & set(labels), "images")
    return pool, key, rec, summary


def group_layout(cache, key: str, view: str, kind: str) -> dict:
    """The row layout of `kind` features in group (key, view); UsageError with a hint when absent."""
    if kind == "embedding":
        return {"kind": "embedding", "units": 1}
    g = cache.group(key, view)
    if g is None:
        raise UsageError(f"{cache.path}: no '{view}' features for {key}")
    if kind == "heads":
        spec = getattr(g, "heads", None)
        if not spec:
            raise UsageError(f"{cache.path}: features {key}/{view} have no attention-head contributions; "
                             + HINTS["heads"])
        return {"kind": "heads", "blocks": list(spec["blocks"]), "n_heads": int(spec["n_heads"]),
                "units": len(spec["blocks"]) * int(spec["n_heads"]), "dim": int(g.dim)}
    if kind in ("layers", "layers_mean", "layers_both"):
        if not g.layers:
            raise UsageError(f"{cache.path}: features {key}/{view} have no block CLS tokens; " + HINTS["layers"])
        n = len(g.layers) * (2 if kind == "layers_both" else 1)
        return {"kind": kind, "blocks": list(g.layers), "units": n}
    raise UsageError(f"unknown feature kind {kind!r}; known: {', '.join(KINDS)}")
