"""Tests of clipdet.detectors.calibration (Platt, temperature, FPR thresholds, CV scores) and attribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneOut, StratifiedKFold

from clipdet.detectors.calibration import (
    apply_platt,
    apply_temperature,
    cross_val_decision,
    fit_platt,
    fit_temperature,
    threshold_at_fpr,
)
from clipdet.detectors.openset import OpenSetRule
from clipdet.errors import DetectorFileError, UsageError


# ---- Platt scaling -------------------------------------------------------------------------------
def test_fit_platt_hand_computed_symmetric_cases():
    # One score per class: Platt targets are 2/3 and 1/3, so sigmoid(a + b) = 2/3 and
    # sigmoid(-a + b) = 1/3, i.e. b = 0 and a = log(2).
    a, b = fit_platt([-1.0, 1.0], [0, 1])
    assert a == pytest.approx(np.log(2), abs=1e-8) and b == pytest.approx(0.0, abs=1e-8)
    # Two per class: targets 3/4 and 1/4, so a = log(3). Separable, yet finite.
    a, b = fit_platt([-1.0, -1.0, 1.0, 1.0], [0, 0, 1, 1])
    assert a == pytest.approx(np.log(3), abs=1e-8) and b == pytest.approx(0.0, abs=1e-8)
    a, b = fit_platt([-1.0, 1.0], [0, 1], fit_intercept=False)
    assert (a, b) == (pytest.approx(np.log(2), abs=1e-8), 0.0)


def test_fit_platt_constant_scores_give_the_smoothed_prior():
    # Scores carry no information: a = 0 and sigmoid(b) = mean target = (3 * 4/5 + 1/3) / 4.
    a, b = fit_platt([0.0, 0.0, 0.0, 0.0], [0, 1, 1, 1])
    t = (3 * 0.8 + 1 / 3) / 4
    assert a == pytest.approx(0.0, abs=1e-10) and b == pytest.approx(np.log(t / (1 - t)), abs=1e-8)


def test_fit_platt_matches_a_generic_optimiser():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    s = 1.5 * (y - 0.3) + rng.normal(size=200)
    w = rng.uniform(0.5, 2.0, size=200)
    n1, n0 = y.sum(), (1 - y).sum()
    t = np.where(y == 1, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))

    def nll(p):
        z = p[0] * s + p[1]
        return np.sum(w * (np.logaddexp(0, z) - t * z))

    ref = minimize(nll, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10}).x
    a, b = fit_platt(s, y, sample_weight=w)
    assert a == pytest.approx(ref[0], abs=1e-5) and b == pytest.approx(ref[1], abs=1e-5)
    assert a > 0


def test_apply_platt_values_and_stability():
    p = apply_platt([0.0, np.log(3), -1e4, 1e4], 1.0, 0.0)
    assert np.allclose(p, [0.5, 0.75, 0.0, 1.0])
    assert np.all(np.isfinite(p))


def test_fit_platt_rejects_bad_input():
    with pytest.raises(UsageError, match="both classes"):
        fit_platt([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        fit_platt([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        fit_platt([0.1, np.nan], [0, 1])


def test_fit_temperature_binary_equals_platt_without_intercept():
    # softmax(a * [0, s]) == sigmoid(a * s): same smoothed targets -> a = log(2).
    a = fit_temperature([[0.0, -1.0], [0.0, 1.0]], [0, 1])
    assert a == pytest.approx(np.log(2), abs=1e-8)
    S = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.5]])
    a = fit_temperature(S, [0, 1, 2, 0])
    p = apply_temperature(S, a)
    assert a > 0 and np.allclose(p.sum(axis=1), 1.0)
    assert fit_temperature(np.zeros((4, 3)), [0, 1, 2, 0]) == 0.0  # no signal -> flat probabilities
    assert fit_temperature(-S, [0, 1, 2, 0]) == 0.0  # anti-correlated -> clamped at 0


# ---- threshold at a target FPR -------------------------------------------------------------------
def test_threshold_at_fpr_hand_computed():
    reals = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    t = threshold_at_fpr(reals, 0.1)
    assert t == np.nextafter(0.9, np.inf)  # only 1.0 is at or above: FPR = 0.1 exactly
    assert np.mean(reals >= t) == pytest.approx(0.1)
    assert np.mean(reals >= np.nextafter(t, -np.inf)) == pytest.approx(0.2)  # nothing smaller works
    t0 = threshold_at_fpr(reals, 0.0)
    assert t0 == np.nextafter(1.0, np.inf) and np.mean(reals >= t0) == 0
    assert threshold_at_fpr(reals, 0.25) == np.nextafter(0.8, np.inf)  # floor(2.5) = 2 allowed
    assert threshold_at_fpr(reals, 1.0) == -np.inf


def test_threshold_at_fpr_never_splits_ties():
    reals = np.array([0.5, 0.5, 0.5, 0.5, 1.0])
    t = threshold_at_fpr(reals, 0.4)  # 2 allowed, but 0.5 has 4 copies: only 1.0 stays above
    assert t == np.nextafter(0.5, np.inf) and np.mean(reals >= t) == pytest.approx(0.2)


def test_threshold_at_fpr_holds_for_float32_scores():
    reals = np.array([0.9, 0.3, 0.7, 0.1], dtype=np.float32)
    t = threshold_at_fpr(reals, 0.25)
    assert np.mean(reals >= t) == 0.25  # compared in float32 (numpy 2 weak scalars) ...
    assert np.mean(reals.astype(np.float64) >= t) == 0.25  # ... and in float64


def test_threshold_at_fpr_rejects_bad_input():
    with pytest.raises(UsageError):
        threshold_at_fpr([], 0.1)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError):
            threshold_at_fpr([0.1, 0.2], bad)


# ---- cross-validated decision values -------------------------------------------------------------
def _blobs(n_per_class, seed=0, n_classes=2):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(loc=3.0 * c, size=(n_per_class, 3)) for c in range(n_classes)])
    return X, np.repeat(np.arange(n_classes), n_per_class)


def test_cross_val_decision_equals_manual_stratified_kfold():
    X, y = _blobs(12)
    est = LogisticRegression()
    out = cross_val_decision(est, X, y, n_splits=4, random_state=7)
    manual = np.empty(len(y))
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=7).split(X, y):
        manual[te] = LogisticRegression().fit(X[tr], y[tr]).decision_function(X[te])
    assert np.array_equal(out, manual)
    assert np.mean((out > 0) == (y == 1)) > 0.9
    assert not hasattr(est, "coef_")  # the estimator itself is never fitted


def test_cross_val_decision_falls_back_to_leave_one_out():
    X, y = _blobs(3)  # 3 per class < 5 folds
    out = cross_val_decision(LogisticRegression(), X, y, n_splits=5)
    manual = np.empty(len(y))
    for tr, te in LeaveOneOut().split(X):
        manual[te] = LogisticRegression().fit(X[tr], y[tr]).decision_function(X[te])
    assert np.array_equal(out, manual)


def test_cross_val_decision_multiclass_and_too_few_samples():
    X, y = _blobs(6, n_classes=3)
    names = np.array(["real", "sdxl", "biggan"])[y]
    out = cross_val_decision(LogisticRegression(), X, names, n_splits=3)
    assert out.shape == (18, 3)
    assert np.mean(np.array(["biggan", "real", "sdxl"])[out.argmax(1)] == names) > 0.9
    with pytest.raises(UsageError, match="at least 2 samples per class.*sdxl"):
        cross_val_decision(LogisticRegression(), X[:7], names[:7], n_splits=3)


# ---- open-set attribution ------------------------------------------------------------------------
def _generators(n, names, seed, d=32, sigma=0.08, centres_seed=99):
    centres = np.random.default_rng(centres_seed).normal(size=(len(names), d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + sigma * rng.normal(size=(n, d)) for c in centres])
    return X, np.repeat(names, n)


def test_open_set_threshold_hand_computed():
    ang = np.deg2rad([0.0, 10.0, 30.0])
    X = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    rule = OpenSetRule(quantile=0.0).fit(X, ["a", "a", "a"])
    # leave-one-out nearest same-generator similarities: cos10, cos10, cos20
    assert np.allclose(rule.loo_similarities_, np.cos(np.deg2rad([10, 10, 20])), atol=1e-6)
    assert rule.threshold_ == pytest.approx(np.cos(np.deg2rad(20)), abs=1e-6)
    rule = OpenSetRule(quantile=0.5).fit(X, ["a", "a", "a"])
    assert rule.threshold_ == pytest.approx(np.cos(np.deg2rad(10)), abs=1e-6)
    q = np.array([[np.cos(np.deg2rad(45)), np.sin(np.deg2rad(45))], [1.0, 0.0]])
    assert list(rule.predict(q, ["a", "a"])) == ["unknown", "a"]  # 15 deg from the nearest: too far


def test_open_set_rule_keeps_known_generators_and_rejects_unseen_ones():
    names = np.array(["biggan", "dalle", "sdxl", "unseen"])
    Xref, gref = _generators(30, names[:3], seed=1)
    rule = OpenSetRule().fit(Xref, gref)
    assert rule.generators_ == ["biggan", "dalle", "sdxl"]
    Xt, gt = _generators(40, names, seed=2)
    known = gt != "unseen"
    # the (hypothetical) closed-set head names the right generator for known images and some
    # known generator for unseen ones
    pred_closed = np.where(known, gt, "sdxl")
    out = rule.predict(Xt, pred_closed)
    assert np.mean(out[known] == gt[known]) >= 0.9
    assert np.mean(out[~known] == "unknown") >= 0.95
    # labels the rule has no references for pass through unchanged
    assert list(rule.predict(Xt[:2], ["real", "real"])) == ["real", "real"]


def test_open_set_rule_state_round_trip_and_errors():
    Xref, gref = _generators(10, np.array(["a", "b"]), seed=3)
    rule = OpenSetRule(quantile=0.1).fit(Xref, gref)
    meta, arrays = rule.get_state()
    rule2 = OpenSetRule.from_state(json.loads(json.dumps(meta)), {k: v.copy() for k, v in arrays.items()})
    Xt, gt = _generators(5, np.array(["a", "b"]), seed=4)
    assert np.array_equal(rule2.similarity(Xt, gt), rule.similarity(Xt, gt))
    assert np.array_equal(rule2.predict(Xt, gt), rule.predict(Xt, gt))
    with pytest.raises(DetectorFileError):
        OpenSetRule.from_state(meta, {"references": arrays["references"]})
    with pytest.raises(UsageError, match="2 or more"):
        OpenSetRule().fit(Xref[:2], ["a", "b"])
    with pytest.raises(UsageError, match="unknown"):
        OpenSetRule().fit(Xref[:2], ["unknown", "unknown"])
    with pytest.raises(ValueError):
        OpenSetRule(quantile=2.0).fit(Xref, gref)
    with pytest.raises(UsageError, match="not fitted"):
        OpenSetRule().predict(Xt, gt)
