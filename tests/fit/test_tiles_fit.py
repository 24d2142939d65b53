"""`fit --tiles`: the tile rule and an image-level threshold learned on the references' tiles only."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from clipdet.detectors.tiles import TileCalibration, mix, parse_rule, rule_name
from clipdet.errors import UsageError
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool


def test_rules_parse_name_and_mix():
    assert [parse_rule(r) for r in ("mean", "max", "mix:0.25", "auto", None)] == [0.0, 1.0, 0.25, None, None]
    assert [rule_name(w) for w in (0, 1, 0.5)] == ["mean", "max", "mix:0.5"]
    for bad in ("mix:2", "mix:x", "median"):
        with pytest.raises(UsageError, match="--tile-rule"):
            parse_rule(bad)
    S = np.array([[0.0, 2.0], [np.nan, 1.0], [np.nan, np.nan]])
    np.testing.assert_allclose(mix(S, 0.25), [0.75 * 1.0 + 0.25 * 2.0, 1.0, np.nan])


def _images(rng, n: int, fake: bool, T: int = 4, d: int = 8):
    """Whole-image rows and T tile rows: a fake's trace is strong in one tile and diluted in the whole."""
    whole = rng.normal(size=(n, d))
    tiles = rng.normal(size=(T, n, d))
    if fake:
        whole[:, 0] += 0.8
        tiles[rng.integers(0, T, n), np.arange(n), 0] += 3.0
    return whole, tiles


def _pools(seed: int, n: int = 30):
    rng = np.random.default_rng(seed)
    (wr, tr), (wf, tf) = _images(rng, n, False), _images(rng, n, True)
    shas = [f"{i:064x}" for i in range(2 * n)]
    lab, gen, paths = ["real"] * n + ["fake"] * n, [""] * n + ["g"] * n, [f"p{i}.png" for i in range(2 * n)]
    whole = Pool(shas, lab, gen, paths, np.vstack([wr, wf]).astype(np.float32))
    tiles = [Pool(shas, lab, gen, paths, np.vstack([tr[t], tf[t]]).astype(np.float32)) for t in range(4)]
    return whole, tiles


def test_learned_rule_and_image_threshold_hold_on_new_images():
    _, new_tiles = _images(np.random.default_rng(99), 4000, False)  # real images no fit ever saw
    fpr, naive = [], []
    for seed in range(4):
        pool, tiles = _pools(seed)
        det = _fit(pool, tiles)
        cal = TileCalibration.from_meta(det.meta)
        t = det.meta["tiles"]
        assert (cal.size, cal.count) == (64, 4) and set(t["auc"]) == {"mean", "mix:0.25", "mix:0.5", "mix:0.75", "max"}
        assert cal.weight >= 0.5 and t["auc"]["max"] > t["auc"]["mean"]  # one strong tile: the max carries it
        S = np.stack([det.decision_function(new_tiles[k]) for k in range(4)], axis=1)
        agg = mix(S, cal.weight)
        fpr.append(np.mean(agg >= cal.threshold))
        naive.append(np.mean(S.max(axis=1) >= det.threshold))  # the max of tiles at the whole-image threshold
        assert np.array_equal(cal.proba(agg) >= 0.5, agg >= cal.threshold)
    # the image-level threshold keeps new reals at the 0.05 target; the whole-image one on the max flags more
    assert np.mean(fpr) <= 0.07 and np.mean(fpr) < np.mean(naive)
    fixed = _fit(pool, tiles, tile_rule="mean")
    assert fixed.meta["tiles"]["weight"] == 0.0 and list(fixed.meta["tiles"]["auc"]) == ["mean"]


def _fit(pool, tiles, **kw):
    from clipdet.fit.config import FitConfig

    return fit_from_pool(pool, FitConfig(head="logreg", seed=0, tiles="64:4", **kw), attribute=False, tiles=tiles)


def test_tiles_need_calibration():
    pool, tiles = _pools(1, 10)
    from clipdet.fit.config import FitConfig

    with pytest.raises(UsageError, match="--tiles calibrates on the references"):
        fit_from_pool(pool, FitConfig(head="logreg", tiles="64:4"), attribute=False, tiles=tiles, calibrate=False)


def test_fit_and_score_on_tiles_cli(labelled_tree, tiny_spec, tiny_backbone, run_cli, tmp_path):
    from clipdet.detectors.detector import Detector

    cache, det_path = str(tmp_path / "c.h5"), str(tmp_path / "t.clipdet")
    r = run_cli("fit", labelled_tree, "-b", tiny_spec, "-c", cache, "--shots", "4", "--tiles", "64:3",
                "-o", det_path, "--no-attribute")
    assert r.exit_code == 0, r.output
    assert "tiles 64:3: rule " in r.output and "the default view for score" in r.output
    det = Detector.load(det_path)
    cal = TileCalibration.from_meta(det.meta)
    assert (cal.size, cal.count) == (64, 3) and cal.default
    out = tmp_path / "rows.csv"
    r = run_cli("score", labelled_tree / "fake", "-d", det_path, "-c", cache, "-o", out)
    assert r.exit_code == 0, r.output
    assert "scoring on the detector's tiles 64:3" in r.output
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 16 and {x["tile_rule"] for x in rows} == {cal.rule}
    for x in rows:
        tiles = [float(v) for v in x["tile_scores"].split(";")]
        assert float(x["score"]) == pytest.approx(float(mix(np.array([tiles]), cal.weight)[0]), abs=1e-5)
        assert (x["label"] == "fake") == (float(x["score"]) >= cal.threshold)
        assert (float(x["p_fake"]) >= 0.5) == (x["label"] == "fake")
    r = run_cli("score", labelled_tree / "fake", "-d", det_path, "-c", cache, "--tiles", "none", "-o", out)
    assert r.exit_code == 0 and "tile_rule" not in out.read_text().splitlines()[0]
    r = run_cli("score", labelled_tree / "fake", "-d", det_path, "-c", cache, "--tiles", "64:2", "-o", out)
    assert r.exit_code == 0 and "no calibration for 64:2 tiles" in r.output
    # eval measures what score does: the tiles, at the detector's image-level threshold
    import json

    r = run_cli("eval", labelled_tree, "-d", det_path, "-c", cache, "--json", "--allow-overlap")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["detector"]["view"] == "tiles 64:3" and res["detector"]["threshold"] == pytest.approx(cal.threshold)
    assert any("scored on tiles 64:3" in n for n in res["notes"])
    whole = json.loads(run_cli("eval", labelled_tree, "-d", det_path, "-c", cache, "--json", "--allow-overlap",
                               "--tiles", "none").stdout)
    assert whole["detector"]["threshold"] == pytest.approx(det.threshold) and whole["detector"]["view"] == "clean"
    r = run_cli("fit", labelled_tree, "-b", tiny_spec, "-c", cache, "--shots", "4", "--tiles", "64:3",
                "--tile-rule", "median", "-o", str(tmp_path / "x.clipdet"))
    assert r.exit_code == 2 and "--tile-rule 'median'" in r.output and "Traceback" not in r.output


def test_auto_chooses_whether_tiles_are_the_view(labelled_tree, tiny_spec, tiny_backbone, run_cli, tmp_path):
    from clipdet.detectors.detector import Detector

    cache, det_path = str(tmp_path / "c.h5"), str(tmp_path / "a.clipdet")
    r = run_cli("fit", labelled_tree, "-b", tiny_spec, "-c", cache, "--shots", "4", "--head", "auto",
                "--tiles", "64:2", "-o", det_path, "--no-attribute")
    assert r.exit_code == 0, r.output
    t = Detector.load(det_path).meta["tiles"]
    assert isinstance(t["default"], bool) and t["auc_whole"] is not None and len(t["auc"]) == 5
    assert ("the default view for score" if t["default"] else "did not beat the whole image") in r.output


def test_tiles_refuse_attention_heads(labelled_tree, tiny_spec, tiny_backbone, run_cli, tmp_path):
    cache = str(tmp_path / "h.h5")
    assert run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "--heads", "2").exit_code == 0
    r = run_cli("fit", labelled_tree, "-b", tiny_spec, "-c", cache, "--head", "heads", "--shots", "4",
                "--tiles", "64:2", "-o", str(tmp_path / "h.clipdet"))
    assert r.exit_code == 2 and "not attention heads" in r.output and "Traceback" not in r.output
