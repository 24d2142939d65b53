"""Embedding pruning (Gaintseva et al. 2024): drop the components that mislead across generators.

`fit_pruner` picks, greedily and on the references only, the K components whose removal most raises
the mean cross-validated AUC (leave-one-generator-out when the references name >= 2 generators,
see `clipdet.detectors.refcv`) of a cheap class-mean-difference classifier. Components are coordinates
(``basis="coord"``: zeroed) or principal directions of the references (``basis="pca"``: projected
out). A `Pruner` is stored in the detector file as plain arrays and applied before the head.

Feature rows made of several embedding-space vectors (attention-head contributions, block tokens;
``unit_dim`` < width) are pruned vector by vector, and chosen from the sum of their vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..detectors.prune import BASES, Pruner
from ..errors import UsageError

MAX_PCA = 128  # principal directions considered as candidates (at most n - 1 exist anyway)


def _candidates(Xs: np.ndarray, basis: str) -> np.ndarray:
    """Orthonormal rows spanning the candidate components: identity, or the references' principal axes."""
    d = Xs.shape[1]
    if basis == "coord":
        return np.eye(d)
    centred = Xs - Xs.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    m = min(MAX_PCA, max(1, len(Xs) - 1), d)
    vt = vt[:m]
    sign = np.sign(vt[np.arange(m), np.abs(vt).argmax(axis=1)])
    return vt * sign[:, None]  # a fixed sign: the same references give the same directions


def fit_pruner(X, y, generators: Sequence[str], k: int, basis: str = "coord", seed: int = 0,
               unit_dim: int | None = None) -> Pruner:
    """Greedily choose `k` components to remove (see the module docstring); returns a `Pruner`."""
    if basis not in BASES:
        raise UsageError(f"--prune-basis {basis!r}: expected coord or pca")
    X = np.asarray(X, dtype=np.float64)
    d = int(unit_dim or X.shape[1])
    if X.shape[1] % d:
        raise UsageError(f"pruning: rows of width {X.shape[1]} are not made of {d}-wide vectors")
    Xs = X.reshape(len(X), -1, d).sum(axis=1)
    from ..detectors.refcv import centroid_direction, column_auc, reference_folds

    y = np.asarray(y)
    folds, kind = reference_folds(y, generators, seed)
    if not folds:
        raise UsageError("--prune needs at least 2 real and 2 fake references to cross-validate on")
    B = _candidates(Xs, basis)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < len(B):
        raise UsageError(f"--prune {k}: expected 1 to {len(B) - 1} (the {basis} candidates available)")
    T = Xs @ B.T  # (n, m): each reference in the candidate basis
    per_fold = []
    for tr, te in folds:
        w = centroid_direction(Xs[tr], y[tr])
        per_fold.append((Xs[te] @ w, T[te] * (B @ w)[None, :], y[te]))

    def criteria(removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean fold AUC and class separation (mean gap / std of the scores) after removing `removed`
        and then each candidate in turn (column j)."""
        auc = sep = 0.0
        for s0, contrib, yt in per_fold:
            S = (s0 - contrib[:, removed].sum(axis=1))[:, None] - contrib
            auc = auc + column_auc(S, yt)
            gap = S[yt == 1].mean(axis=0) - S[yt == 0].mean(axis=0)
            sep = sep + gap / np.maximum(S.std(axis=0), 1e-12)
        return auc / len(per_fold), sep / len(per_fold)

    removed: list[int] = []
    before = _auc_now(per_fold, [])
    for _ in range(int(k)):
        auc, sep = criteria(np.array(removed, np.int64))
        auc[removed], sep[removed] = -np.inf, -np.inf
        # best AUC; among equal AUCs (few references make many) the best separated; then the first
        removed.append(int(np.lexsort((np.arange(len(auc)), -sep, -np.round(auc, 9)))[0]))
    info = {"cv": kind, "folds": len(folds), "auc_before": before, "auc_after": _auc_now(per_fold, removed),
            "k": int(k)}
    if basis == "coord":
        return Pruner("coord", d, np.array(sorted(removed)), None, info)
    return Pruner("pca", d, None, B[removed], info)


def _auc_now(per_fold, removed) -> float:
    from ..detectors.refcv import column_auc

    vals = [column_auc((s0 - contrib[:, removed].sum(axis=1))[:, None], yt)[0] for s0, contrib, yt in per_fold]
    return float(np.mean(vals))
