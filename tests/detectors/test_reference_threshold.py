"""The threshold rule for few real references (`reference_threshold`, `fit --threshold-rule`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from clipdet.detectors.calibration import reference_threshold, threshold_at_fpr
from clipdet.errors import UsageError
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool


def test_bound_hand_computed_at_ten_references():
    r = np.array([-1.2, -0.9, -0.7, -0.5, -0.4, -0.3, -0.1, 0.0, 0.2, 0.4])
    t, how = reference_threshold(r, 0.05)
    want = r.mean() + student_t.ppf(0.95, 9) * r.std(ddof=1) * np.sqrt(1.1)
    assert how == "normal-prediction-bound" and t == pytest.approx(want) and t > r.max()
    assert reference_threshold(r, 0.05, "empirical") == (threshold_at_fpr(r, 0.05), "empirical")


def test_enough_references_take_the_conformal_quantile():
    rng = np.random.default_rng(0)
    r = rng.normal(size=40)  # k = ceil(0.95 x 41) = 39: one reference score may stay above the threshold
    assert reference_threshold(r, 0.05) == (threshold_at_fpr(r, 1 / 40), "conformal")
    assert np.sum(r >= reference_threshold(r, 0.05)[0]) == 1
    assert threshold_at_fpr(r, 0.05) < reference_threshold(r, 0.05)[0]  # the empirical rule leaves two above
    r20 = rng.normal(size=20)  # k = ceil(0.95 x 21) = 20: the largest, exactly as conformal as it gets
    assert reference_threshold(r20, 0.05) == (threshold_at_fpr(r20, 0.0), "conformal")
    skew = np.array([0.0] * 9 + [10.0])  # one far outlier: the largest score is already above the bound
    assert reference_threshold(skew, 0.05) == (threshold_at_fpr(skew, 0.0), "largest-reference")
    assert reference_threshold([0.1, 0.2], 0.05)[1] == "largest-reference"  # too few for a spread
    with pytest.raises(UsageError, match="threshold rule 'x'"):
        reference_threshold(r, 0.05, "x")


def test_false_positive_rate_over_many_draws_meets_the_target_for_normal_scores():
    """The reason for the rule: for a new real image, the empirical threshold misses the target at small n
    (1/11 at 10 references, 2/21 at 20); the auto rule meets it (exactly at 10 for normal scores)."""
    rng = np.random.default_rng(1)
    for n, empirical in ((10, 1 / 11), (20, 2 / 21)):
        draws = rng.normal(size=(4000, n))
        fpr = {rule: np.mean([norm.sf(reference_threshold(d, 0.05, rule)[0]) for d in draws])
               for rule in ("empirical", "auto")}
        assert fpr["empirical"] == pytest.approx(empirical, abs=0.006)
        assert fpr["auto"] <= 0.052


def _pool(n: int, sep: float) -> Pool:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2 * n, 8)).astype(np.float32)
    X[n:, 0] += sep
    return Pool([f"{i:064x}" for i in range(2 * n)], ["real"] * n + ["fake"] * n, [""] * n + ["g1"] * n,
                [f"p{i}.png" for i in range(2 * n)], X)


def test_fit_records_the_rule_and_summary_says_so():
    few = fit_from_pool(_pool(10, 1.0), head="logreg", seed=0, attribute=False)
    assert few.meta["calibration"]["threshold_rule"] == "normal-prediction-bound"
    few.meta["backbone"] = {"spec": "test"}  # fit_from_pool leaves the backbone to its caller
    assert "normal prediction bound" in few.summary()
    plain = fit_from_pool(_pool(10, 1.0), head="logreg", seed=0, attribute=False, threshold_rule="empirical")
    assert plain.meta["calibration"]["threshold_rule"] == "empirical" and plain.threshold < few.threshold
    many = fit_from_pool(_pool(40, 1.0), head="logreg", seed=0, attribute=False)
    assert many.meta["calibration"]["threshold_rule"] == "conformal"
    with pytest.raises(UsageError, match="--threshold-rule 'bogus'"):
        fit_from_pool(_pool(10, 1.0), head="logreg", threshold_rule="bogus")
