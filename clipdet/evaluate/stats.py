"""Small statistics in plain numpy: Student-t quantiles, mean with a t-interval, bootstrap intervals."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from ..errors import UsageError
from .metrics import NAN, _labels, _scores, _two_classes, roc_auc

# --------------------------------------------------------------------------- intervals


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    bt = math.exp(lbt)
    if x < (a + 1.0) / (a + b + 2.0):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, 1.0 - x) / b


def _t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t for t >= 0."""
    x = df / (df + t * t)
    return 0.5 * _betainc(df / 2.0, 0.5, x)


def t_quantile(q: float, df: float) -> float:
    """Quantile ``q`` (0 < q < 1) of Student's t with ``df`` degrees of freedom (no scipy needed)."""
    if not (0.0 < q < 1.0):
        raise UsageError(f"q must lie in (0, 1), got {q!r}")
    if not df > 0:
        raise UsageError(f"df must be positive, got {df!r}")
    if q == 0.5:
        return 0.0
    tail = 1.0 - q if q > 0.5 else q
    lo, hi = 0.0, 1.0
    while _t_sf(hi, df) > tail:
        hi *= 2.0
        if hi > 1e12:
            break
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and t-interval half-width of ``values`` (e.g. one K of a k-shot curve over seeds).

    The interval is ``mean ± half_width`` with the Student t quantile for ``n - 1`` degrees of
    freedom. Returns ``(nan, nan)`` for no values and ``(value, nan)`` for one; NaN values
    propagate.
    """
    if not (isinstance(level, numbers.Real) and 0.0 < float(level) < 1.0):
        raise UsageError(f"level must lie in (0, 1), got {level!r}")
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n == 0:
        return NAN, NAN
    mean = float(v.mean())
    if n == 1:
        return mean, NAN
    sd = float(v.std(ddof=1))
    half = t_quantile(0.5 + float(level) / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, float(half)


def bootstrap_ci(
    y_true,
    scores,
    metric: Callable = roc_auc,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``metric(y, scores)`` on one test set.

    Resamples reals and fakes separately (stratified) so every replicate has both classes.
    Returns ``(point_estimate, low, high)``; all NaN unless both classes are present.
    """
    if not (isinstance(level, numbers.Real) and 0.0 < float(level) < 1.0):
        raise UsageError(f"level must lie in (0, 1), got {level!r}")
    if not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise UsageError(f"n_boot must be a positive integer, got {n_boot!r}")
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if not _two_classes(y):
        return NAN, NAN, NAN
    point = float(metric(y, s))
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    stats = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        idx = np.concatenate((rng.choice(pos, pos.size), rng.choice(neg, neg.size)))
        stats[b] = metric(y[idx], s[idx])
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.nanquantile(stats, [alpha, 1.0 - alpha])
    return point, float(lo), float(hi)
