"""Detection metrics in plain numpy.

Conventions used throughout:

* ``y`` / ``y_true``: 1 = fake (AI-generated), 0 = real. Booleans are accepted.
* ``scores``: higher = more likely fake (a head's ``decision_function``); any real scale.
* ``p_fake``: a calibrated probability of "fake" in [0, 1].

Ranking metrics (AUC, AP, TPR at FPR, EER) need both classes; with one class (or no samples)
they return ``float('nan')`` instead of raising. ``binary_report`` records why in its ``notes``.
Bad input (non-binary labels, NaN scores, mismatched lengths) raises `UsageError`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from ..errors import UsageError

NAN = float("nan")


# --------------------------------------------------------------------------- validation


def _labels(y, name: str = "y_true") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise UsageError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UsageError(f"{name} must hold 0 (real) and 1 (fake), got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise UsageError(
            f"{name} must hold only 0 (real) and 1 (fake); found {arr[bad][0]!r} "
            f"({int(bad.sum())} bad value(s))"
        )
    return arr.astype(np.int64)


def _scores(s, n: int, name: str = "scores") -> np.ndarray:
    arr = np.asarray(s)
    if arr.ndim != 1:
        raise UsageError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise UsageError(f"{name} has {arr.shape[0]} values but the labels have {n}")
    try:
        arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be numeric, got dtype {arr.dtype}") from None
    if np.isnan(arr).any():
        raise UsageError(f"{name} contains NaN ({int(np.isnan(arr).sum())} value(s))")
    return arr


def _probs(p, n: int, name: str = "p_fake") -> np.ndarray:
    arr = _scores(p, n, name)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise UsageError(f"{name} must lie in [0, 1], got range [{arr.min():g}, {arr.max():g}]")
    return arr


def _two_classes(y: np.ndarray) -> bool:
    n_fake = int(y.sum())
    return 0 < n_fake < y.size


def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (like scipy's ``rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of tie groups in sorted order
    change = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [xs.size]))
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def _roc_counts(y: np.ndarray, s: np.ndarray):
    """Cumulative (fp, tp) counts at each distinct threshold, thresholds descending."""
    order = np.argsort(-s, kind="mergesort")
    ys = y[order]
    ss = s[order]
    last = np.flatnonzero(np.diff(ss) != 0)  # last index of each tie group (but the final one)
    last = np.concatenate((last, [ys.size - 1]))
    tps = np.cumsum(ys)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return fps, tps, ss[last]


# --------------------------------------------------------------------------- ranking metrics


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic; ties count one half.

    Returns NaN unless both classes are present.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if not _two_classes(y):
        return NAN
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    ranks = _rankdata(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(y_true, scores) -> float:
    """Average precision: sum over distinct thresholds of (R_n - R_{n-1}) * P_n, no interpolation.

    Same definition as ``sklearn.metrics.average_precision_score``. Returns NaN unless both
    classes are present (with only fakes AP is trivially 1 and says nothing about the scores).
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if not _two_classes(y):
        return NAN
    fps, tps, _ = _roc_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    d_recall = np.diff(np.concatenate(([0.0], recall)))
    return float(np.sum(d_recall * precision))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score, thresholds descending.

    Predicting "fake" when ``score >= thresholds[i]`` gives ``(fpr[i], tpr[i])``. The first point
    is (0, 0) at threshold +inf. No intermediate points are dropped. With one class the
    undefined axis (fpr without reals, tpr without fakes) is all NaN.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if y.size == 0:
        return np.array([0.0]), np.array([0.0]), np.array([np.inf])
    fps, tps, thr = _roc_counts(y, s)
    fps = np.concatenate(([0.0], fps))
    tps = np.concatenate(([0.0], tps))
    thr = np.concatenate(([np.inf], thr))
    n_pos = tps[-1]
    n_neg = fps[-1]
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thr


def tpr_at_fpr(y_true, scores, fpr: float = 0.01) -> float:
    """True-positive rate at a false-positive-rate budget, without interpolation.

    Takes the highest TPR among the ROC operating points (distinct score thresholds) whose FPR is
    <= ``fpr``; this is an operating point a real threshold achieves, so it never overstates
    the detector. Returns NaN unless both classes are present.
    """
    if not (isinstance(fpr, numbers.Real) and 0.0 <= float(fpr) <= 1.0):
        raise UsageError(f"fpr must be a number in [0, 1], got {fpr!r}")
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if not _two_classes(y):
        return NAN
    f, t, _ = roc_curve(y, s)
    ok = f <= float(fpr) + 1e-12
    return float(t[ok].max())


def eer(y_true, scores) -> float:
    """Equal error rate: where FPR equals FNR (= 1 - TPR) on the ROC curve.

    The ROC points are joined by straight lines (randomised thresholds between two points) and
    the crossing with FPR = 1 - TPR is returned, so the result is exact, not a nearest point.
    Returns NaN unless both classes are present.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if not _two_classes(y):
        return NAN
    f, t, _ = roc_curve(y, s)
    g = f + t - 1.0  # non-decreasing from -1 to +1; zero where FPR == FNR
    i = int(np.argmax(g >= 0.0))
    if g[i] == 0.0 or i == 0:
        return float(f[i])
    frac = -g[i - 1] / (g[i] - g[i - 1])
    return float(f[i - 1] + frac * (f[i] - f[i - 1]))


# --------------------------------------------------------------------------- decisions


def _label_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays, checked to be 1-D and of equal length."""
    a = np.asarray(y_true)
    b = np.asarray(y_pred)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise UsageError(f"y_true and y_pred must be 1-D of equal length, got {a.shape} and {b.shape}")
    return a, b


def accuracy(y_true, y_pred) -> float:
    """Fraction of predictions equal to the true labels (any label type); NaN when empty."""
    a, b = _label_pair(y_true, y_pred)
    if a.size == 0:
        return NAN
    return float(np.mean(a == b))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (sklearn's definition).

    With one class present this is that class's recall (= accuracy); NaN when empty.
    """
    a, b = _label_pair(y_true, y_pred)
    if a.size == 0:
        return NAN
    recalls = [float(np.mean(b[a == c] == c)) for c in np.unique(a)]
    return float(np.mean(recalls))


def confusion_matrix(true_labels, pred_labels, labels: Sequence | None = None,
                     columns: Sequence | None = None) -> tuple[list, np.ndarray]:
    """Counts ``matrix[i, j]`` of samples with true label ``labels[i]`` predicted as ``labels[j]``.

    ``labels`` fixes the order (default: sorted union of both inputs). A value missing from
    ``labels`` raises `UsageError` rather than being dropped silently. Returns ``(labels, matrix)``.
    ``columns``: other labels for the predictions (a rectangular matrix, ``matrix[i, j]`` true
    ``labels[i]`` predicted ``columns[j]``), e.g. only the classes a detector can answer.
    """
    a = np.asarray(true_labels)
    b = np.asarray(pred_labels)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise UsageError(
            f"true and predicted labels must be 1-D of equal length, got {a.shape} and {b.shape}"
        )
    if labels is None:
        labels = sorted(set(a.tolist()) | set(b.tolist()))
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    if len(index) != len(labels):
        raise UsageError("labels must not repeat")
    cols = labels if columns is None else list(columns)
    cindex = {lab: j for j, lab in enumerate(cols)}
    if len(cindex) != len(cols):
        raise UsageError("columns must not repeat")
    unknown = sorted({str(v) for v in a.tolist() if v not in index} | {str(v) for v in b.tolist() if v not in cindex})
    if unknown:
        raise UsageError(f"labels not in the label list: {', '.join(unknown[:10])}")
    m = np.zeros((len(labels), len(cols)), dtype=np.int64)
    for t, p in zip(a.tolist(), b.tolist(), strict=True):
        m[index[t], cindex[p]] += 1
    return labels, m


# --------------------------------------------------------------------------- calibration


def ece(y_true, p_fake, n_bins: int = 15) -> float:
    """Expected calibration error of ``p_fake`` with ``n_bins`` equal-width bins on [0, 1].

    Bins are [k/n, (k+1)/n), the last one closed; ECE = sum_b (n_b / N) * |mean(y_b) - mean(p_b)|,
    i.e. how far the predicted probability of "fake" is from the observed fraction of fakes.
    Defined for one class too; NaN when empty.
    """
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise UsageError(f"n_bins must be a positive integer, got {n_bins!r}")
    y = _labels(y_true)
    p = _probs(p_fake, y.size)
    if y.size == 0:
        return NAN
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    nz = counts > 0
    gap = np.abs(sum_y[nz] - sum_p[nz])  # = n_b * |mean(y_b) - mean(p_b)|
    return float(gap.sum() / y.size)


def brier(y_true, p_fake) -> float:
    """Brier score: mean squared difference between ``p_fake`` and the 0/1 label; NaN when empty."""
    y = _labels(y_true)
    p = _probs(p_fake, y.size)
    if y.size == 0:
        return NAN
    return float(np.mean((p - y) ** 2))


# --------------------------------------------------------------------------- report


def binary_report(y_true, scores, p_fake=None, threshold: float = 0.0) -> dict:
    """All binary metrics in one dict.

    Keys: n, n_real, n_fake, auc, ap, accuracy, balanced_accuracy, tpr_at_1pct_fpr, eer, ece,
    brier, threshold, notes. Decisions are ``scores >= threshold`` (threshold on the score scale).
    ``p_fake`` may be None, in which case ece and brier are NaN. ``notes`` lists every metric left
    NaN and why (one class, no samples, no probabilities).
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if not isinstance(threshold, numbers.Real) or math.isnan(float(threshold)):
        raise UsageError(f"threshold must be a number, got {threshold!r}")
    threshold = float(threshold)
    n = int(y.size)
    n_fake = int(y.sum())
    n_real = n - n_fake
    notes: list[str] = []
    pred = (s >= threshold).astype(np.int64)
    out = {
        "n": n,
        "n_real": n_real,
        "n_fake": n_fake,
        "auc": roc_auc(y, s),
        "ap": average_precision(y, s),
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, s, 0.01),
        "eer": eer(y, s),
        "ece": NAN,
        "brier": NAN,
        "threshold": threshold,
    }
    if p_fake is not None:
        p = _probs(p_fake, n)
        out["ece"] = ece(y, p)
        out["brier"] = brier(y, p)
    elif n:
        notes.append("no p_fake given: ece and brier are NaN")
    if n == 0:
        notes.append("no samples: every metric is NaN")
    elif n_real == 0 or n_fake == 0:
        present = "fake" if n_real == 0 else "real"
        notes.append(
            f"only {present} images: auc, ap, tpr_at_1pct_fpr and eer are undefined (NaN); "
            f"accuracy and balanced_accuracy are the recall on {present} images"
        )
    out["notes"] = notes
    return out
