"""Cross-validation on the references only, for choices made while fitting (pruning, head selection).

`reference_folds` splits labelled references into (train, test) folds: leave-one-generator-out when
the fakes name two or more generators (each fold tests one generator's fakes against a share of the
reals, and trains on the rest), else stratified K folds. `column_auc` scores many candidate
columns at once; `centroid_direction` is the cheap class-mean-difference classifier both use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reference_folds(y, generators: Sequence[str], seed: int = 0, n_splits: int = 5) -> tuple[list, str]:
    """``([(train_idx, test_idx), ...], kind)`` with kind "leave-one-generator-out" or "stratified-k".

    `y`: 1 fake / 0 real; `generators`: the fakes' generator names ('' when unnamed; unnamed fakes are
    training-only in leave-one-generator-out). Folds whose train or test side lacks a class are dropped.
    """
    y = np.asarray(y)
    gens = np.array([g or "" for g in generators], dtype=object)
    rng = np.random.default_rng(seed)
    reals = np.flatnonzero(y == 0)
    named = sorted({g for g, t in zip(gens, y) if t == 1 and g})
    folds = []
    if len(named) >= 2:
        share = np.empty(len(reals), np.int64)
        share[rng.permutation(len(reals))] = np.arange(len(reals)) % len(named)
        for i, g in enumerate(named):
            test = np.concatenate([reals[share == i], np.flatnonzero((y == 1) & (gens == g))])
            train = np.setdiff1d(np.arange(len(y)), test)
            folds.append((train, np.sort(test)))
        kind = "leave-one-generator-out"
    else:
        from sklearn.model_selection import StratifiedKFold

        k = int(min(n_splits, np.bincount(y.astype(np.int64), minlength=2).min()))
        if k >= 2:
            folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
        kind = "stratified-k"
    ok = [(tr, te) for tr, te in folds if len(set(y[tr])) == 2 and len(set(y[te])) == 2]
    return ok, kind


def centroid_direction(X, y) -> np.ndarray:
    """Mean of the fakes minus mean of the reals (the last axis of `X`), per leading axis."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    return X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)


def average_ranks(S) -> np.ndarray:
    """1-based ranks of each column of `S` (n, m), ties sharing their average rank (scipy's rankdata
    with method="average", axis=0, without importing scipy.stats)."""
    S = np.asarray(S, dtype=np.float64)
    n = len(S)
    order = np.argsort(S, axis=0, kind="stable")
    s = np.take_along_axis(S, order, axis=0)
    first = np.ones(s.shape, bool)
    first[1:] = s[1:] != s[:-1]  # position starts a run of equal values
    last = np.ones(s.shape, bool)
    last[:-1] = first[1:]
    idx = np.arange(n)[:, None]
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, idx, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(s.shape)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    return ranks


def column_auc(S, y) -> np.ndarray:
    """ROC AUC of every column of the scores `S` (n, m) against labels `y` (1 positive), ties halved."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    r = average_ranks(S)
    return (r[y].sum(axis=0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


#: Default accuracy a side of the threshold must reach, on the references' cross-validated scores, to
#: be "decided": at 10 shots per class this tolerates one reference in ten misclassified on that side.
UNSURE_ACCURACY = 0.9


def unsure_band(scores, y, threshold: float, accuracy: float = UNSURE_ACCURACY) -> dict:
    """The score range around `threshold` where cross-validated reference scores are not accurate enough.

    `scores`: out-of-fold decision values of the references (never evaluation images), `y` 1 fake / 0
    real. Above the threshold, `high` is the lowest score from which at least `accuracy` of the
    references scoring that high are fakes; below it, `low` is the highest score under which at least
    `accuracy` of the references are reals. Scores in ``[low, high)`` get the verdict "unsure". A side
    no cut makes accurate enough extends past every reference score on it. Returns low, high, accuracy,
    n, the share of references inside the band (`unsure_rate`) and the accuracy outside it
    (`decided_accuracy`); ``low == high == threshold`` when cross-validation made no mistakes.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    t = float(threshold)
    if not 0 < accuracy <= 1:
        raise ValueError(f"accuracy must be in (0, 1], got {accuracy}")

    def first(cands, select, want):
        for c in cands:
            sel = select(c)
            if not sel.any() or (y[sel] == want).mean() >= accuracy:
                return float(c)
        return float(cands[-1])

    up = [t] + [float(np.nextafter(v, np.inf)) for v in np.unique(s[s >= t])]
    high = first(up, lambda c: s >= c, 1)
    down = [t] + [float(v) for v in np.unique(s[s < t])[::-1]]
    down.append(float(np.nextafter(down[-1], -np.inf)))
    low = first(down, lambda c: s < c, 0)
    inside = (s >= low) & (s < high)
    out = ~inside
    dec = float(((s[out] >= t) == (y[out] == 1)).mean()) if out.any() else float("nan")
    return {"low": low, "high": high, "threshold": t, "accuracy": float(accuracy), "n": int(len(s)),
            "unsure_rate": float(inside.mean()) if len(s) else 0.0, "decided_accuracy": dec}
