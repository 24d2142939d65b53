"""Score calibration helpers: Platt scaling, temperature scaling, thresholds at a target FPR, CV scores.

Pure numpy except `cross_val_decision`, which imports scikit-learn when called.

Sign convention: every probability here is ``sigmoid(a * score + b)`` (or ``softmax(a * scores)``),
so ``a > 0`` when higher scores mean the positive class. Platt (1999) writes
``1 / (1 + exp(A f + B))``; our ``(a, b)`` is his ``(-A, -B)``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

__all__ = [
    "apply_platt",
    "apply_temperature",
    "cross_val_decision",
    "fit_platt",
    "fit_temperature",
    "proba_at_threshold",
    "sigmoid",
    "softmax",
    "reference_threshold",
    "threshold_at_fpr",
]

#: How `reference_threshold` may place the threshold: "auto" (for new real images: the conformal quantile,
#: or the normal prediction bound when the references are too few for any) or "empirical" (for the
#: references themselves: `threshold_at_fpr`).
THRESHOLD_RULES = ("auto", "empirical")


def sigmoid(z) -> np.ndarray:
    """Numerically stable logistic function, as float64."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def softmax(z) -> np.ndarray:
    """Row-wise softmax of a 2-D array, as float64."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _binary_targets(scores, y, sample_weight):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(y).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and y differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    pos = y == 1
    if not np.all(pos | (y == 0)):
        raise ValueError("y must hold 0 (negative) and 1 (positive) only")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise UsageError("calibration needs scores of both classes (y=0 and y=1)")
    # Platt's target smoothing: a MAP estimate under a uniform prior on each class' label noise.
    t = np.where(pos, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    w = np.ones_like(s) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.shape != s.shape or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("sample_weight must be finite, non-negative, not all zero, one per score")
    return s, t, w


def _nll(z, t, w):
    # sum_i w_i * [ log(1 + e^{z_i}) - t_i z_i ]   (cross-entropy with soft targets t)
    return float(np.sum(w * (np.logaddexp(0.0, z) - t * z)))


def fit_platt(scores, y, *, fit_intercept: bool = True, sample_weight=None, max_iter: int = 100):
    """Fit Platt scaling ``p = sigmoid(a * score + b)``; returns ``(a, b)`` as floats.

    Uses Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, so the fit stays
    finite on separable or tiny data, and the Newton method with backtracking line search of
    Lin, Lin & Weng (2007). ``fit_intercept=False`` pins ``b = 0`` (the decision threshold 0 keeps
    p = 0.5). ``y`` holds 0/1; both must occur (else `UsageError`).
    """
    s, t, w = _binary_targets(scores, y, sample_weight)
    # Start from the prior log-odds of the targets, as Platt does.
    prior1 = float(np.sum(w * t))
    prior0 = float(np.sum(w)) - prior1
    a = 0.0
    b = float(np.log((prior1 + 1e-12) / (prior0 + 1e-12))) if fit_intercept else 0.0
    ridge = 1e-12
    f = _nll(a * s + b, t, w)
    for _ in range(max_iter):
        p = sigmoid(a * s + b)
        d1 = w * (p - t)  # dNLL/dz
        d2 = w * p * (1.0 - p)
        g_a = float(np.sum(d1 * s))
        h_aa = float(np.sum(d2 * s * s)) + ridge
        if fit_intercept:
            g_b = float(np.sum(d1))
            h_bb = float(np.sum(d2)) + ridge
            h_ab = float(np.sum(d2 * s))
            if abs(g_a) < 1e-10 and abs(g_b) < 1e-10:
                break
            det = h_aa * h_bb - h_ab * h_ab
            if det <= 0:
                det = ridge
            da = -(h_bb * g_a - h_ab * g_b) / det
            db = -(-h_ab * g_a + h_aa * g_b) / det
            gd = g_a * da + g_b * db
        else:
            if abs(g_a) < 1e-10:
                break
            da, db = -g_a / h_aa, 0.0
            gd = g_a * da
        step = 1.0
        while step >= 1e-10:
            na, nb = a + step * da, b + step * db
            nf = _nll(na * s + nb, t, w)
            if nf < f + 1e-4 * step * gd:
                break
            step /= 2.0
        else:
            break  # no decrease possible: at the optimum up to rounding
        done = abs(f - nf) <= 1e-15 * max(1.0, abs(f))
        a, b, f = na, nb, nf
        if done:
            break
    return float(a), float(b)


def apply_platt(scores, a: float, b: float) -> np.ndarray:
    """Probability of the positive class, ``sigmoid(a * scores + b)``, as float64."""
    return sigmoid(a * np.asarray(scores, dtype=np.float64) + b)


def fit_temperature(scores, y, *, sample_weight=None, max_iter: int = 100) -> float:
    """Fit one slope ``a >= 0`` so that ``softmax(a * scores)`` matches labels (multi-class Platt).

    ``scores`` has shape (n, n_classes), ``y`` holds column indices. Targets are smoothed like
    Platt's: ``(n_c + 1) / (n_c + 2)`` on the true class, the rest spread evenly over the others,
    so the slope stays finite on separable data. The negative log-likelihood is convex in ``a``;
    it is minimised by a safeguarded 1-D Newton method. Returns 0.0 if the scores carry no signal.
    """
    S = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).ravel()
    if S.ndim != 2 or S.shape[0] != y.shape[0] or S.shape[1] < 2:
        raise ValueError("scores must have shape (n_samples, n_classes >= 2) matching y")
    if not np.all(np.isfinite(S)):
        raise ValueError("scores must be finite")
    n, k = S.shape
    y = y.astype(np.int64)
    if np.any(y < 0) or np.any(y >= k):
        raise ValueError("y must hold column indices of scores")
    counts = np.bincount(y, minlength=k)
    if np.count_nonzero(counts) < 2:
        raise UsageError("calibration needs scores of at least two classes")
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.shape != (n,) or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("sample_weight must be finite, non-negative, not all zero, one per row")
    t_true = (counts[y] + 1.0) / (counts[y] + 2.0)
    T = np.repeat(((1.0 - t_true) / (k - 1))[:, None], k, axis=1)
    T[np.arange(n), y] = t_true
    st = np.sum(T * S, axis=1)  # target-weighted score per row

    def nll(a):
        z = a * S
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        return float(np.sum(w * (lse - a * st)))

    a = 0.0
    f = nll(a)
    for _ in range(max_iter):
        P = softmax(a * S)
        mean = np.sum(P * S, axis=1)
        g = float(np.sum(w * (mean - st)))
        h = float(np.sum(w * (np.sum(P * S * S, axis=1) - mean * mean))) + 1e-12
        if abs(g) < 1e-10:
            break
        d = -g / h
        if a + d < 0:
            d = -a  # the constraint a >= 0
            if d == 0:
                break
        step = 1.0
        while step >= 1e-10:
            na = a + step * d
            nf = nll(na)
            if nf < f + 1e-4 * step * g * d:
                break
            step /= 2.0
        else:
            break
        done = abs(f - nf) <= 1e-15 * max(1.0, abs(f))
        a, f = na, nf
        if done:
            break
    return float(max(a, 0.0))


def proba_at_threshold(scores, slope: float, threshold: float) -> np.ndarray:
    """P(fake) ``sigmoid(slope * (score - threshold))``, clamped so that ``p >= 0.5`` exactly when
    ``score >= threshold`` (the verdict); a non-finite threshold gives 0 or 1."""
    s = np.asarray(scores, dtype=np.float64)
    t = float(threshold)
    if not np.isfinite(t):
        return np.where(s >= t, 1.0, 0.0)
    p = sigmoid(float(slope) * (s - t))
    return np.where(s >= t, np.maximum(p, 0.5), np.minimum(p, np.nextafter(0.5, 0.0)))


def apply_temperature(scores, a: float) -> np.ndarray:
    """Class probabilities ``softmax(a * scores)`` for scores of shape (n, n_classes)."""
    return softmax(a * np.asarray(scores, dtype=np.float64))


def threshold_at_fpr(real_scores, target_fpr: float) -> float:
    """Smallest threshold ``t`` with ``mean(real_scores >= t) <= target_fpr``.

    With ``m = floor(target_fpr * n)`` real scores allowed at or above ``t``, the answer is the
    next representable number above the (m+1)-th largest real score (computed in the scores' own
    floating dtype, float64 for integers, so comparing float32 scores with it gives the same
    count). Ties are never split: all real scores equal to a candidate count as flagged, so with
    ties the achieved FPR can be below the target, never above it. ``target_fpr >= 1`` returns
    ``-inf`` (flag everything); ``target_fpr = 0`` returns just above the largest real score.
    """
    r = np.asarray(real_scores)
    if r.ndim != 1:
        r = r.ravel()
    if r.size == 0:
        raise UsageError("threshold_at_fpr needs at least one real score")
    if not np.issubdtype(r.dtype, np.floating):
        r = r.astype(np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError("real scores must be finite")
    try:
        f = float(target_fpr)
    except (TypeError, ValueError):
        raise ValueError(f"target_fpr must be a number in [0, 1], got {target_fpr!r}") from None
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr!r}")
    n = r.size
    m = int(np.floor(f * n + 1e-9))  # tolerate 0.1 * 10 = 0.9999999...
    if m >= n:
        return float("-inf")
    desc = np.sort(r)[::-1]
    pivot = desc[m]
    return float(np.nextafter(pivot, np.array(np.inf, dtype=r.dtype)))


def reference_threshold(real_scores, target_fpr: float, rule: str = "auto") -> tuple[float, str]:
    """(threshold, how it was placed) for a target false-positive rate, from real references' scores.

    Rule "auto" aims at the target for a *new* real image, not for the references themselves. A new
    real score is exchangeable with the n reference scores, so it exceeds the k-th smallest with
    probability at most ``1 - k / (n + 1)``; the threshold sits just above the k-th smallest real score
    with ``k = ceil((1 - target) (n + 1))`` (the split-conformal quantile: "conformal"). When k > n (fewer
    than ``(1 - target) / target`` references, 19 at 0.05) no order statistic reaches the target (above
    the largest of 10, a new real still lands with probability 1/11 = 0.091): the threshold then also
    clears the one-sided normal prediction bound ``mean + t(1 - target, n - 1) * sd * sqrt(1 + 1/n)``
    (the textbook bound for one new draw from a normal sample of size n; "normal-prediction-bound"), or
    stays just above the largest score when that is higher ("largest-reference"). Rule "empirical" is
    `threshold_at_fpr`: at most the target share of the references themselves flagged, which lets a new
    real through more often at small n (about (floor(target n) + 1) / (n + 1)).
    """
    if rule not in THRESHOLD_RULES:
        raise UsageError(f"threshold rule {rule!r}: expected {' or '.join(THRESHOLD_RULES)}")
    if rule == "empirical":
        return threshold_at_fpr(real_scores, target_fpr), "empirical"
    r = np.asarray(real_scores, dtype=np.float64).ravel()
    n = r.size
    f = float(target_fpr)
    if n == 0 or f <= 0 or f >= 1:
        return threshold_at_fpr(real_scores, target_fpr), "empirical"
    above = n - int(np.ceil((1.0 - f) * (n + 1) - 1e-9))  # reference scores the threshold may leave above it
    if above >= 0:
        return threshold_at_fpr(real_scores, above / n), "conformal"
    top = threshold_at_fpr(real_scores, 0.0)
    if n < 3:
        return top, "largest-reference"
    from scipy.stats import t as student_t

    bound = float(r.mean() + student_t.ppf(1.0 - f, n - 1) * r.std(ddof=1) * np.sqrt(1.0 + 1.0 / n))
    return (bound, "normal-prediction-bound") if bound > top else (top, "largest-reference")


def cross_val_decision(estimator, X, y, n_splits: int = 5, random_state: int | None = 0,
                       *, loo_max_samples: int = 100) -> np.ndarray:
    """Out-of-fold ``decision_function`` values of ``estimator`` on ``(X, y)``.

    Each fold fits a fresh ``sklearn.base.clone`` of the estimator. Uses a shuffled
    ``StratifiedKFold(n_splits)`` when every class has at least ``n_splits`` samples. When classes
    are tiny it falls back to leave-one-out (at most ``loo_max_samples`` rows; beyond that, to
    stratified K-fold with K = the smallest class count, i.e. leave-one-out of the rarest class).
    Every class needs at least 2 samples, else `UsageError`. Returns shape (n,) for two classes,
    (n, n_classes) otherwise, in ``np.unique(y)`` column order.
    """
    from sklearn.base import clone
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold

    X = np.asarray(X) if not hasattr(X, "shape") else X
    y = np.asarray(y).ravel()
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y differ in length: {X.shape[0]} vs {y.shape[0]}")
    classes, y_idx = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise UsageError("cross-validated scores need samples of at least 2 classes")
    counts = np.bincount(y_idx)
    if counts.min() < 2:
        few = [str(c) for c, k in zip(classes, counts) if k < 2]
        raise UsageError(
            "cross-validated calibration needs at least 2 samples per class; "
            f"too few for: {', '.join(few)} (add references or disable calibration)"
        )
    n_splits = int(n_splits)
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if counts.min() >= n_splits:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    elif y.shape[0] <= loo_max_samples:
        splitter = LeaveOneOut()
    else:
        splitter = StratifiedKFold(n_splits=int(counts.min()), shuffle=True, random_state=random_state)
    out = None
    for train, test in splitter.split(np.zeros((y.shape[0], 1)), y_idx):
        est = clone(estimator)
        Xtr = X[train]
        est.fit(Xtr, y[train])
        if not np.array_equal(np.asarray(est.classes_), classes):
            raise UsageError("a cross-validation fold lost a class; add samples per class")
        d = np.asarray(est.decision_function(X[test]), dtype=np.float64)
        if out is None:
            out = np.zeros((y.shape[0],) + d.shape[1:], dtype=np.float64)
        out[test] = d
    return out
