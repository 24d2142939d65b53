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


def column_auc(S, y) -> np.ndarray:
    """ROC AUC of every column of the scores `S` (n, m) against labels `y` (1 positive), ties halved."""
    from scipy.stats import rankdata

    S = np.asarray(S, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    r = rankdata(S, axis=0)
    return (r[y].sum(axis=0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
