"""Robustness: fit on clean views, test on perturbed views of the same held-out images."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..fit.config import DEFAULT_TARGET_FPR, FitConfig
from ..fit.pools import Pool
from .common import METRICS, Rows, _fit, _need_both, _score, _testable_split, _train_counts, summarise
from .parse import parse_heads, parse_seeds
from .shortcut import SHORTCUT_VIEW

DEFAULT_VIEWS = ("jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "blur:1", "crop:224")


def summarise_robustness(rows: Iterable[Mapping]) -> list[dict]:
    """Per (head, fit view, test view): mean and 95% half-width over seeds, including `delta_auc`."""
    return summarise(rows, ("head", "fit_view", "view"), METRICS + ("delta_auc",))


# --------------------------------------------------------------------------- robustness


def align_views(pools_by_view: Mapping[str, Pool], clean_view: str = "clean") -> tuple[dict[str, Pool], list[str]]:
    """The pools restricted to the images present in every view, in the clean pool's order; labels
    and generators from the clean pool. Returns (aligned pools, notes)."""
    if clean_view not in pools_by_view:
        raise UsageError(f"robustness needs features of the '{clean_view}' view (have: {', '.join(pools_by_view)})")
    clean = pools_by_view[clean_view]
    index = {v: {s: i for i, s in enumerate(p.sha256)} for v, p in pools_by_view.items()}
    keep = [i for i, s in enumerate(clean.sha256) if all(s in idx for idx in index.values())]
    notes = []
    dropped = len(clean) - len(keep)
    if dropped:
        notes.append(f"robustness: {dropped} image(s) lack features of some view and were left out, so every view "
                     "is measured on the same images")
    base = clean.take(keep)
    out = {}
    for v, p in pools_by_view.items():
        q = p.take([index[v][s] for s in base.sha256])
        out[v] = Pool(list(base.sha256), list(base.label), list(base.generator), list(base.path), q.X, q.feats)
    return out, notes


def view_shift(pools_by_view: Mapping[str, Pool], clean_view: str = "clean") -> list[dict]:
    """How far each view moves the embeddings: a check that a perturbation really changed the features.

    Per view: `mean_shift` = mean L2 distance between an image's view and clean embeddings (same images),
    and `relative_shift` = that divided by the clean embeddings' mean distance to their centroid (the
    spread between images). Near 0 means the view leaves the features (almost) untouched.
    """
    pools, _ = align_views(pools_by_view, clean_view)
    clean = pools[clean_view].X.astype(np.float64)
    spread = float(np.linalg.norm(clean - clean.mean(axis=0), axis=1).mean()) if len(clean) else math.nan
    out = []
    for v, p in pools.items():
        if v == clean_view:
            continue
        shift = float(np.linalg.norm(p.X.astype(np.float64) - clean, axis=1).mean()) if len(clean) else math.nan
        out.append({"view": v, "n": len(clean), "mean_shift": shift,
                    "relative_shift": shift / spread if spread else math.nan})
    return out


def robustness(
    pools_by_view: Mapping[str, Pool],
    heads: str | Sequence[str],
    shots: int | None = 10,
    seeds: int | Sequence[int] = 5,
    target_fpr: float = DEFAULT_TARGET_FPR,
    clean_view: str = "clean",
    shortcut_view: str | None = SHORTCUT_VIEW,
    per_generator: bool = False,
    params: Mapping[str, dict] | None = None,
    fit_config: FitConfig | None = None,
    text=None,
) -> Rows:
    """AUC per view: fit on the clean features of sampled references, test on every view's features of
    the same non-reference images (real and fake perturbed identically, identical image sets).

    One row per (head, view, seed) with fit_view = clean, the `METRICS` (accuracy at the clean-calibrated
    threshold, so threshold drift shows) and `delta_auc` = AUC(view) - AUC(clean). When `shortcut_view`
    (default jpeg:95: every image re-encoded the same way) is among the views, extra rows with
    fit_view = view = `shortcut_view` fit and test on re-encoded features; see `format_shortcut`.
    """
    from ..extract.views import canonical_view

    heads, seeds = parse_heads(heads), parse_seeds(seeds)
    pools, notes = align_views({canonical_view(v): p for v, p in pools_by_view.items()}, canonical_view(clean_view))
    clean_view = canonical_view(clean_view)
    clean = pools[clean_view]
    _need_both(clean, "robustness")
    views = [clean_view] + [v for v in pools if v != clean_view]
    shortcut = canonical_view(shortcut_view) if shortcut_view else None
    rows = Rows(notes=notes)
    if shortcut and shortcut not in pools:
        rows.notes.append(f"robustness: no {shortcut} features, so no format-shortcut check")
        shortcut = None
    plans = []
    for seed in seeds:
        split = _testable_split(clean, shots, seed, per_generator, rows.notes, f"robustness: seed {seed}",
                                hint=" (lower --shots)")
        if split is not None:
            plans.append((seed, *split))
    for head in heads:
        for seed, train, test in plans:
            p = (params or {}).get(head)
            det = _fit(clean.take(train), head, seed, target_fpr, p, fit_config, text)
            base = None
            for v in views:
                r = {"protocol": "robustness", "head": head, "fit_view": clean_view, "view": v, "seed": seed,
                     "shots": "all" if shots is None else shots, **_train_counts(clean.take(train)),
                     **_score(det, pools[v].take(test))}
                base = r["auc"] if v == clean_view else base
                r["delta_auc"] = r["auc"] - base
                rows.append(r)
            if shortcut:
                det2 = _fit(pools[shortcut].take(train), head, seed, target_fpr, p, fit_config, text)
                r = {"protocol": "robustness", "head": head, "fit_view": shortcut, "view": shortcut, "seed": seed,
                     "shots": "all" if shots is None else shots, **_train_counts(clean.take(train)),
                     **_score(det2, pools[shortcut].take(test))}
                r["delta_auc"] = r["auc"] - base
                rows.append(r)
    return rows
