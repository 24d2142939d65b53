"""Metrics against hand-computed values and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipdet.errors import UsageError
from clipdet.evaluate import metrics, stats

Y = [0, 0, 1, 1]
S = [0.1, 0.4, 0.35, 0.8]


def test_roc_auc_hand():
    assert metrics.roc_auc(Y, S) == pytest.approx(0.75)
    assert metrics.roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert metrics.roc_auc([0, 1], [0.9, 0.2]) == 0.0
    # ties count one half
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    # booleans accepted
    assert metrics.roc_auc(np.array(Y, bool), S) == pytest.approx(0.75)


def test_average_precision_hand():
    # ranked: 0.8(fake) 0.4(real) 0.35(fake) 0.1(real): P@1 = 1, P@3 = 2/3 -> AP = (1 + 2/3) / 2
    assert metrics.average_precision(Y, S) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.average_precision([0, 1, 1], [0.1, 0.5, 0.9]) == 1.0


def test_roc_curve_hand():
    fpr, tpr, thr = metrics.roc_curve(Y, S)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], [0.8, 0.4, 0.35, 0.1])


def test_tpr_at_fpr_hand():
    assert metrics.tpr_at_fpr(Y, S, 0.0) == 0.5
    assert metrics.tpr_at_fpr(Y, S, 0.01) == 0.5
    assert metrics.tpr_at_fpr(Y, S, 0.49) == 0.5  # no interpolation toward the next point
    assert metrics.tpr_at_fpr(Y, S, 0.5) == 1.0
    assert metrics.tpr_at_fpr(Y, S, 1.0) == 1.0
    with pytest.raises(UsageError):
        metrics.tpr_at_fpr(Y, S, 1.5)


def test_eer_hand():
    assert metrics.eer(Y, S) == pytest.approx(0.5)
    assert metrics.eer([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.eer([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 1.0
    # one real above all fakes of 2, 4 reals: ROC (0,0) (.25,0) (.25,1) ... -> crossing at fpr .25
    assert metrics.eer([0, 0, 0, 0, 1, 1], [0.9, 0.1, 0.2, 0.3, 0.5, 0.6]) == pytest.approx(0.25)
    # interpolated crossing: ROC (0,0) -> (1,1) with ties everywhere -> FPR = FNR = 0.5
    assert metrics.eer([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_accuracy_and_balanced():
    assert metrics.accuracy([0, 0, 1, 1], [0, 1, 1, 1]) == 0.75
    # recall real 1/3, recall fake 1 -> 2/3
    assert metrics.balanced_accuracy([0, 0, 0, 1], [0, 1, 1, 1]) == pytest.approx((1 / 3 + 1) / 2)
    assert math.isnan(metrics.accuracy([], []))
    with pytest.raises(UsageError):
        metrics.accuracy([0, 1], [0])


def test_ece_hand():
    # p in bins [0.1,0.2) and [0.8,0.867): bin1 mean p .1 vs frac 0, bin2 mean p .8 vs frac .5
    y = [0, 0, 1, 0]
    p = [0.1, 0.1, 0.8, 0.8]
    assert metrics.ece(y, p, n_bins=15) == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    assert metrics.ece([0, 1], [0.0, 1.0]) == 0.0
    assert metrics.ece([1], [1.0]) == 0.0  # p = 1 goes in the last bin
    assert metrics.ece([0, 1], [0.5, 0.5], n_bins=1) == 0.0
    with pytest.raises(UsageError):
        metrics.ece([0, 1], [0.2, 1.2])
    with pytest.raises(UsageError):
        metrics.ece([0, 1], [0.2, 0.8], n_bins=0)


def test_brier_hand():
    assert metrics.brier([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    assert metrics.brier([1, 1], [1.0, 1.0]) == 0.0


def test_confusion_matrix():
    labels, mat = metrics.confusion_matrix(
        ["real", "sd", "sd", "mj"], ["real", "sd", "mj", "mj"], ["real", "sd", "mj"]
    )
    assert labels == ["real", "sd", "mj"]
    np.testing.assert_array_equal(mat, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    labels, mat = metrics.confusion_matrix([0, 1, 1], [1, 1, 0])
    assert labels == [0, 1]
    np.testing.assert_array_equal(mat, [[0, 1], [1, 1]])
    with pytest.raises(UsageError, match="dalle"):
        metrics.confusion_matrix(["real", "dalle"], ["real", "real"], ["real"])


@pytest.mark.parametrize("fn", [metrics.roc_auc, metrics.average_precision, metrics.eer, metrics.tpr_at_fpr])
@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1], []])
def test_single_class_nan(fn, y):
    s = np.linspace(0, 1, len(y))
    assert math.isnan(fn(y, s))


def test_single_class_roc_curve_nan_axis():
    fpr, tpr, _ = metrics.roc_curve([1, 1], [0.2, 0.3])
    assert np.isnan(fpr).all()
    np.testing.assert_allclose(tpr, [0, 0.5, 1])


def test_bad_inputs():
    with pytest.raises(UsageError, match="0 \\(real\\) and 1"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(UsageError, match="NaN"):
        metrics.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(UsageError, match="labels have"):
        metrics.roc_auc([0, 1], [0.1])
    with pytest.raises(UsageError):
        metrics.roc_auc([[0, 1]], [[0.1, 0.2]])


def test_binary_report_keys_and_values():
    r = metrics.binary_report(Y, S, p_fake=[0.1, 0.6, 0.4, 0.9], threshold=0.37)
    for key in ("n", "n_real", "n_fake", "auc", "ap", "accuracy", "balanced_accuracy", "tpr_at_1pct_fpr",
                "eer", "ece", "brier", "threshold", "notes"):
        assert key in r
    assert (r["n"], r["n_real"], r["n_fake"]) == (4, 2, 2)
    assert r["auc"] == pytest.approx(0.75)
    # predictions at 0.37: [0, 1, 0, 1] -> 2 of 4 right
    assert r["accuracy"] == 0.5 and r["balanced_accuracy"] == 0.5
    assert r["tpr_at_1pct_fpr"] == 0.5
    assert r["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert r["threshold"] == 0.37
    assert r["notes"] == []


def test_binary_report_single_class_notes():
    r = metrics.binary_report([1, 1, 1], [0.2, 0.6, 0.9], p_fake=[0.2, 0.6, 0.9], threshold=0.5)
    assert math.isnan(r["auc"]) and math.isnan(r["ap"]) and math.isnan(r["eer"])
    assert math.isnan(r["tpr_at_1pct_fpr"])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert not math.isnan(r["brier"])
    assert any("only fake" in n for n in r["notes"])
    r = metrics.binary_report([], [], None, 0.0)
    assert r["n"] == 0 and math.isnan(r["accuracy"]) and math.isnan(r["ece"])
    assert any("no samples" in n for n in r["notes"])
    r = metrics.binary_report(Y, S, None, 0.5)
    assert math.isnan(r["ece"]) and any("p_fake" in n for n in r["notes"])


def test_agreement_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(2, 200))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.normal(size=n) + y
        if trial % 2:
            s = np.round(s, 1)  # many ties
        assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        assert metrics.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
        fpr, tpr, thr = metrics.roc_curve(y, s)
        fpr2, tpr2, thr2 = skm.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, fpr2)
        np.testing.assert_allclose(tpr, tpr2)
        np.testing.assert_allclose(thr[1:], thr2[1:])
        pred = (s >= 0.5).astype(int)
        assert metrics.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
        assert metrics.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))
        p = 1 / (1 + np.exp(-s))
        assert metrics.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p))
        _, mat = metrics.confusion_matrix(y, pred, [0, 1])
        np.testing.assert_array_equal(mat, skm.confusion_matrix(y, pred, labels=[0, 1]))
        # TPR at FPR: best tpr among points with fpr <= target (sklearn's full curve)
        assert metrics.tpr_at_fpr(y, s, 0.1) == pytest.approx(tpr2[fpr2 <= 0.1].max())
        # EER: FPR rises and FNR falls along the curve, so at every ROC point the EER lies
        # between that point's FPR and FNR
        e = metrics.eer(y, s)
        fnr2 = 1 - tpr2
        assert np.all(np.minimum(fpr2, fnr2) - 1e-12 <= e)
        assert np.all(e <= np.maximum(fpr2, fnr2) + 1e-12)


def test_ece_against_manual_loop():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = rng.random(300)
    n_bins = 10
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (p >= lo) & ((p < hi) if b < n_bins - 1 else (p <= hi))
        if sel.any():
            total += sel.sum() / y.size * abs(y[sel].mean() - p[sel].mean())
    assert metrics.ece(y, p, n_bins) == pytest.approx(total)


def test_t_quantile_table():
    # classic two-sided 95% table values
    table = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045, 1000: 1.962}
    for df, t in table.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    assert stats.t_quantile(0.5, 3) == 0.0


def test_t_quantile_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7, 10, 30, 100):
        for q in (0.9, 0.95, 0.975, 0.995, 0.05):
            assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-8, abs=1e-8)


def test_mean_ci():
    mean, half = stats.mean_ci([0.8, 0.85, 0.9])
    assert mean == pytest.approx(0.85)
    assert half == pytest.approx(4.302652729749464 * 0.05 / math.sqrt(3))
    mean, half = stats.mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert all(math.isnan(v) for v in stats.mean_ci([]))
    assert stats.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(UsageError):
        stats.mean_ci([1, 2], level=95)


def test_bootstrap_ci():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + 1.5 * y
    point, lo, hi = stats.bootstrap_ci(y, s, n_boot=200, seed=3)
    assert point == pytest.approx(metrics.roc_auc(y, s))
    assert lo < point < hi
    assert stats.bootstrap_ci(y, s, n_boot=200, seed=3) == (point, lo, hi)  # seeded, reproducible
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1, 1], [0.1, 0.2]))
