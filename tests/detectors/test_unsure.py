"""The unsure band: computed at fit from the references' cross-validated scores, stored in the detector."""

from __future__ import annotations

import numpy as np
import pytest

from clipdet.detectors.detector import Detector
from clipdet.detectors.refcv import unsure_band
from clipdet.errors import UsageError
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool


def test_band_hand_computed():
    # reals 0..9 at -9..0, one real misclassified high (0.6); fakes at 1..9 and one low (-0.5)
    s = np.array([-9, -8, -7, -6, -5, -4, -3, -2, -1, 0.6, -0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9], float)
    y = np.array([0] * 10 + [1] * 10)
    b = unsure_band(s, y, threshold=0.5, accuracy=0.95)
    # above: every score >= 0.6 with the real included is 9/10 fake < 0.95 -> the cut moves just past 0.6
    assert b["high"] == np.nextafter(0.6, np.inf)
    # below: scores < 0.5 hold 9 reals + the fake at -0.5 (0.9 < 0.95) -> the band starts at -0.5
    assert b["low"] == -0.5
    assert b["unsure_rate"] == pytest.approx(2 / 20) and b["decided_accuracy"] == 1.0
    loose = unsure_band(s, y, threshold=0.5, accuracy=0.9)  # one error in ten is tolerated on each side
    assert loose["low"] == loose["high"] == 0.5 and loose["unsure_rate"] == 0.0


def test_band_empty_when_separable_and_whole_side_when_hopeless():
    y = np.array([0] * 5 + [1] * 5)
    b = unsure_band(np.r_[-np.arange(1, 6.0), np.arange(1, 6.0)], y, threshold=0.0)
    assert b["low"] == b["high"] == 0.0
    swapped = unsure_band(np.r_[np.arange(1, 6.0), -np.arange(1, 6.0)], y, threshold=0.0)
    assert swapped["low"] <= -5 and swapped["high"] > 5 and swapped["unsure_rate"] == 1.0


def _pool(n: int, sep: float, seed: int = 0) -> Pool:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2 * n, 16)).astype(np.float32)
    X[n:, 0] += sep
    labels = ["real"] * n + ["fake"] * n
    gens = [""] * n + ["g1"] * n
    return Pool([f"{i:064x}" for i in range(2 * n)], labels, gens, [f"p{i}.png" for i in range(2 * n)], X)


def test_fit_stores_band_from_references_and_file_round_trip(tmp_path):
    det = fit_from_pool(_pool(20, 2.0), head="logreg", seed=0, attribute=False)
    band = det.meta["unsure"]
    assert band["method"] == "cross-validation" and band["n"] == 40 and band["accuracy"] == 0.9
    assert band["low"] <= det.threshold <= band["high"] and band["high"] > band["low"]  # overlapping classes
    lo, hi = det.unsure_range()
    assert (lo, hi) == (band["low"], band["high"])
    assert det.unsure_range(threshold=det.threshold + 1.0) == pytest.approx((lo + 1.0, hi + 1.0))
    assert "unsure band: scores in [" in det.describe_unsure()
    det.save(tmp_path / "d.clipdet")
    again = Detector.load(tmp_path / "d.clipdet")
    assert again.unsure_range() == (lo, hi)
    stricter = fit_from_pool(_pool(20, 2.0), head="logreg", seed=0, attribute=False, unsure_accuracy=0.99)
    s_lo, s_hi = stricter.unsure_range()
    assert s_lo <= lo and s_hi >= hi and (s_lo, s_hi) != (lo, hi)
    with pytest.raises(UsageError, match="unsure-accuracy"):
        fit_from_pool(_pool(20, 2.0), head="logreg", unsure_accuracy=0.2)


def test_detector_without_band_loads_and_has_none(tmp_path):
    det = fit_from_pool(_pool(10, 4.0), head="centroid", seed=0, attribute=False)
    del det.meta["unsure"]  # as written before bands existed
    det.save(tmp_path / "old.clipdet")
    old = Detector.load(tmp_path / "old.clipdet")
    assert old.unsure_range() is None and "none" in old.describe_unsure()
    nocal = fit_from_pool(_pool(10, 4.0), head="centroid", seed=0, attribute=False, calibrate=False)
    assert nocal.unsure_range() is None
