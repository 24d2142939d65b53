"""Issue 15, item 14: honest reports — p_fake agrees with the verdict, thin calibration is said, intervals
stay inside [0, 1], the attribution matrix is row-normalised with counts, random weights are flagged first."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fit_tree

from clipdet.detectors.detector import Detector
from clipdet.evaluate.run import evaluate, write_report
from clipdet.extract.discover import discover
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool


def _pool(n_real: int, n_fake: int, seed: int = 0, sep: float = 0.3, gens=("g1", "g2")) -> Pool:
    rng = np.random.default_rng(seed)
    d = 16
    X = rng.normal(size=(n_real + n_fake, d)).astype(np.float32)
    X[n_real:, 0] += sep * 4
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    labels = ["real"] * n_real + ["fake"] * n_fake
    gen = [""] * n_real + [gens[i % len(gens)] for i in range(n_fake)]
    return Pool([f"{i:064x}" for i in range(len(labels))], labels, gen, [f"p{i}.png" for i in range(len(labels))], X)


@pytest.mark.parametrize("head", ["svm", "logreg", "centroid", "knn"])
def test_p_fake_and_verdict_agree_and_vary(head):
    pool = _pool(10, 10, sep=0.15)
    det = fit_from_pool(pool, head=head, seed=0, attribute=False)
    X = _pool(200, 200, seed=5, sep=0.15).X
    for t in (None, det.threshold - 0.1, det.threshold + 0.05):
        rows = det.score_features(X, threshold=t)
        tt = det.threshold if t is None else t
        for r in rows:
            assert (r["p_fake"] >= 0.5) == (r["score"] >= tt) == (r["label"] == "fake")
        s = np.array([r["score"] for r in rows])
        p = np.array([r["p_fake"] for r in rows])
        order = np.argsort(s)
        assert np.all(np.diff(p[order]) >= 0)  # monotone in the score
        assert p.std() > 0.01, "p_fake must not be a constant"


def test_thin_calibration_is_said():
    det = fit_from_pool(_pool(10, 10), head="svm", seed=0, attribute=False)
    assert any("calibration" in n and "10 real and 10 fake" in n for n in det.meta["notes"])
    big = fit_from_pool(_pool(60, 60), head="svm", seed=0, attribute=False)
    assert not any("too little" in n for n in big.meta["notes"])


def test_anti_informative_calibration_keeps_the_mapping_monotone():
    from clipdet.fit.head import calibration_slope

    scores = np.array([3.0, 2.0, 1.0, -1.0, -2.0, -3.0])  # fakes score low: no signal the right way
    y = np.array([0, 0, 0, 1, 1, 1])
    a, notes = calibration_slope(scores, y, 0.0)
    assert a > 0 and any("do not separate" in n for n in notes)


def test_intervals_are_clipped_to_the_metric_range():
    from clipdet.evaluate.bench import _fmt_ci

    text = _fmt_ci(0.303, 2.757)
    assert "2.757" not in text and "0.000" in text and "1.000" in text
    assert _fmt_ci(0.8, 0.05) == "0.800 ± 0.050"
    assert "-1.000" in _fmt_ci(-0.2, 3.0, lo=-1.0, hi=1.0)


@pytest.fixture
def fitted(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    cache, path = fit_tree(labelled_tree, tiny_spec, tiny_backbone, tmp_path, head="logreg")
    return labelled_tree, cache, str(path)


def test_attribution_matrix_is_row_normalised_with_counts(fitted, tmp_path):
    tree, cache, det_path = fitted
    det = Detector.load(det_path)
    res = evaluate(discover([str(tree)]), det, cache=cache, exclude_references=True)
    a = res["attribution"]
    m, frac = np.array(a["matrix"]), np.array(a["row_normalised"])
    assert np.allclose(frac.sum(axis=1)[m.sum(axis=1) > 0], 1.0)
    assert np.allclose(frac * m.sum(axis=1, keepdims=True), m)
    text = open(write_report(res, str(tmp_path / "rep"))).read()
    assert "row-normalised" in text and "| true \\ predicted |" in text


def test_random_weight_reports_say_so_on_their_first_line(fitted, tmp_path):
    tree, cache, det_path = fitted
    det = Detector.load(det_path)
    det.meta["backbone"] = {**det.meta["backbone"], "weights": "random"}
    res = evaluate(discover([str(tree)]), det, cache=cache, exclude_references=True)
    first = open(write_report(res, str(tmp_path / "rep"))).readline()
    assert "RANDOM" in first and "say nothing about detection" in first


def test_random_weight_bench_report_says_so_on_its_first_line(tmp_path):
    from clipdet.evaluate.bench import run_bench, write_bench

    pools = {"clean": _pool(20, 20)}
    res = run_bench(pools, "kshot", "centroid", "2", 2, 2,
                    config={"backbone": "clipdet-tiny:random", "backbone_record": {"weights": "random"}})
    files = write_bench(res, tmp_path / "b")
    first = open(files["report.md"]).readline()
    assert "RANDOM" in first and "say nothing about detection" in first


def test_attribution_columns_are_what_the_detector_can_answer_with_unknown(fitted, tmp_path, make_image):
    """Issue 21: no column for a generator the detector cannot predict, always an `unknown` column; a
    generator it never saw is a row marked `(unseen)`."""
    tree, cache, det_path = fitted
    for i in range(3):
        make_image(tree / "fake" / "genC" / f"c{i}.png", size=(64, 64), seed=900 + i, fake=True)
    det = Detector.load(det_path)
    assert sorted(det.meta["generators"]) == ["genA", "genB"]
    res = evaluate(discover([str(tree)]), det, cache=cache, exclude_references=True)
    a = res["attribution"]
    assert a["columns"] == ["real", "genA", "genB", "unknown"]
    assert a["rows"] == a["labels"] == ["real", "genA", "genB", "genC (unseen)"]
    m = np.array(a["matrix"])
    assert m.shape == (4, 4) and m[3].sum() == 3 and m.sum() == res["metrics"]["n"]
    text = open(write_report(res, str(tmp_path / "rep"))).read()
    assert "| genC (unseen) |" in text and "unknown" in text.split("| true \\ predicted |")[1].splitlines()[0]


def test_attribution_matrix_by_hand():
    from clipdet.evaluate.run import attribution_matrix

    scored = [{"label": lab, "generator": g} for lab, g in
              [("real", ""), ("fake", "genA"), ("fake", ""), ("fake", "genA"), ("real", "")]]
    a = attribution_matrix([0, 1, 1, 1, 1], ["", "genA", "genB", "genC", ""], scored, ["genA", "genB"])
    assert a["rows"] == ["real", "genA", "genB", "fake, no generator (unseen)", "genC (unseen)"]
    assert a["columns"] == ["real", "genA", "genB", "unknown"]
    assert a["matrix"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert a["accuracy_on_known"] == 2 / 3
