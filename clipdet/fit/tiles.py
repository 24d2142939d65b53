"""`fit --tiles SIZE:COUNT`: calibrate a detector for scoring on native-resolution tiles.

A tiled image's score is a rule over its tile scores (`clipdet.detectors.tiles.mix`), and a threshold set on
whole images does not hold for it (the max of four tiles flags far more reals than one view). So, on the
references only:
1. their tile views are embedded through the extract path (cached; nothing else is read), and the head
   learns from their whole images and their tiles (it will judge both);
2. out-of-fold scores: each fold's head, fitted the same way on the other references, scores the held-out
   references' whole images and tiles (stratified folds of whole images: an image's tiles never straddle
   a fold); the whole-image threshold comes from these too;
3. the rule's weight on the max is the one whose aggregated out-of-fold scores rank the references best
   (ties go to the lower weight, mean), unless `--tile-rule` fixes it;
4. the image-level threshold (at the target FPR), p_fake's slope and the unsure band come from those
   aggregated scores, as for whole images.
With `--head auto` the tiles become the detector's default view only when the best rule beats the whole
image on the same folds by more than one standard error; otherwise they are stored but not the default.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError


def tile_pools(chosen, cache, key: str, spec: str, size: int, count: int, kinds, device: str = "auto",
               quiet: bool = True) -> list:
    """One `Pool` per tile view (tile:SIZE:0 ...), rows in `chosen`'s order: tiles are embedded first
    for the references whose files are at hand; UsageError when some still lack a tile view."""
    from ..extract.discover import ImageRef
    from ..extract.run import extract
    from ..extract.views import tile_views
    from .pools import load_pool

    views = tile_views(size, count)
    g = cache.group(key, "clean")
    layers = list(g.layers) if g is not None and g.layers and set(kinds) - {"embedding"} else None
    refs = [ImageRef(p, lab, gen or None) for p, lab, gen in zip(chosen.path, chosen.label, chosen.generator)
            if p and os.path.isfile(p)]
    if refs:
        extract(refs, spec, cache=cache, views=views, device=device, quiet=quiet, layers=layers)
    labels = {s: (lab, gen) for s, lab, gen in zip(chosen.sha256, chosen.label, chosen.generator)}
    paths = dict(zip(chosen.sha256, chosen.path))
    out = []
    for v in views:
        if cache.group(key, v) is None:
            raise UsageError(f"fit --tiles: no {v} features for the references and their files are not at hand; "
                             f"run clipdet extract --views {','.join(views)} on them")
        p = load_pool(cache, key, v, shas=chosen.sha256, labels=labels, paths=paths, kinds=kinds)
        where = {s: i for i, s in enumerate(p.sha256)}
        missing = [path for s, path in zip(chosen.sha256, chosen.path) if s not in where]
        if missing:
            raise UsageError(f"fit --tiles: {len(missing)} reference(s) have no {v} features (first: {missing[0]}); "
                             f"run clipdet extract --views {','.join(views)} on them")
        out.append(p.take([where[s] for s in chosen.sha256]))
    return out


def _folds(y, seed: int):
    from sklearn.model_selection import StratifiedKFold

    k = int(min(5, np.bincount(y, minlength=2).min()))
    if k < 2:
        raise UsageError("fit --tiles calibrates on the references: it needs at least 2 per class")
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def out_of_fold(base, model, X, y, tiles, seed: int, trainable: bool = True) -> tuple[np.ndarray, np.ndarray, list]:
    """(whole-image scores (n,), tile scores (n, T), folds) of the references, out of fold when the head
    learns from them. `tiles`: the references' tile feature matrices, one per tile, rows as `X`. Each
    fold's head learns, like the detector's, from the training references' whole images and tiles."""
    from sklearn.base import clone

    n, T = len(y), len(tiles)
    whole, S = np.full(n, np.nan), np.full((n, T), np.nan)
    if not trainable:  # nothing was learned from the references: their scores are out of sample already
        return (np.asarray(model.decision_function(X), np.float64),
                np.stack([np.asarray(model.decision_function(t), np.float64) for t in tiles], axis=1),
                [(np.arange(n), np.arange(n))])
    folds = _folds(y, seed)
    for tr, te in folds:
        m = clone(base).fit(np.vstack([X[tr], *[t[tr] for t in tiles]]), np.tile(y[tr], T + 1))
        whole[te] = m.decision_function(X[te])
        for j, t in enumerate(tiles):
            S[te, j] = m.decision_function(t[te])
    return whole, S, folds


def calibrate_tiles(oof, y, size: int, count: int, *, target_fpr: float, threshold_rule: str, rule: str | None,
                    unsure_accuracy: float, auto_view: bool, slope_fn) -> dict:
    """The detector's ``meta["tiles"]`` from the references' out-of-fold scores `oof` (`out_of_fold`): size,
    count, rule and weight, image-level threshold and slope, unsure band, and the out-of-fold AUC of every
    rule and of the whole image (see the module doc). `slope_fn(scores, y, threshold) -> (slope, notes)`
    is the whole-image calibration's."""
    from ..detectors.calibration import reference_threshold
    from ..detectors.refcv import column_auc, unsure_band
    from ..detectors.tiles import WEIGHTS, mix, parse_rule, rule_name

    fixed = parse_rule(rule)
    y = np.asarray(y, dtype=np.int64)
    whole, S, folds = oof
    weights = WEIGHTS if fixed is None else (fixed,)

    def fold_aucs(scores) -> list[float]:
        return [float(column_auc(scores[te][:, None], y[te])[0]) for _, te in folds if len(set(y[te])) == 2]

    table = {rule_name(w): fold_aucs(mix(S, w)) for w in weights}
    mean = {r: float(np.mean(a)) for r, a in table.items()}
    best = max(weights, key=lambda w: (round(mean[rule_name(w)], 3), -w))
    name = rule_name(best)
    agg = mix(S, best)
    threshold, how = reference_threshold(agg[y == 0], target_fpr, threshold_rule)
    slope, notes = slope_fn(agg, y, threshold)
    whole_aucs = fold_aucs(whole)
    default = True
    if auto_view:  # tiles only when they beat the whole image by more than one standard error
        a = np.asarray(table[name]) - np.asarray(whole_aucs)
        se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("inf")
        default = bool(a.mean() > se)
    band = unsure_band(agg, y, threshold, unsure_accuracy)
    return {"size": int(size), "count": int(count), "rule": name, "weight": float(best),
            "threshold": float(threshold), "threshold_rule": how, "slope": float(slope), "default": default,
            "unsure": {"low": band["low"], "high": band["high"], "accuracy": band["accuracy"]},
            "auc": {r: round(v, 4) for r, v in mean.items()},
            "auc_whole": round(float(np.mean(whole_aucs)), 4) if whole_aucs else None,
            "folds": len(folds), "notes": notes}


def describe(tiles: dict) -> str:
    """One line on a detector's tile calibration, for `fit`'s console output."""
    ranked = ", ".join(f"{r} {a:.3f}" for r, a in sorted(tiles["auc"].items(), key=lambda x: -x[1]))
    view = ("the default view for score" if tiles["default"] else
            "stored, not the default: tiles did not beat the whole image by one standard error")
    return (f"tiles {tiles['size']}:{tiles['count']}: rule {tiles['rule']}, threshold {tiles['threshold']:.4g} on "
            f"the rule's image scores; out-of-fold AUC on the references: {ranked}; whole image "
            f"{tiles['auc_whole']}; {view}")
