"""`clipdet serve` scores detectors that read block tokens (--blocks), uncached and from the cache."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

import clipdet  # noqa: E402
from clipdet.detectors.detector import Detector  # noqa: E402
from clipdet.extract.discover import discover  # noqa: E402
from clipdet.extract.lazy import LazyBackbone  # noqa: E402
from clipdet.serve import Engine  # noqa: E402


def test_engine_scores_block_detectors_like_clipdet_score(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    cache = str(tmp_path / "b.h5")
    clipdet.extract(discover([str(labelled_tree)]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone, layers=(0, 1)))
    det_path = str(clipdet.fit(head="svm", blocks="both:1", shots=5, seed=0, cache=cache)
                   .save(tmp_path / "d.clipdet"))
    det = Detector.load(det_path)
    assert det.layout["kind"] == "layers_both" and det.layout["blocks"] == [1]
    files = sorted((labelled_tree / "fake" / "genA").iterdir())[:3]
    want = {x["sha256"]: x["score"] for x in det.score_paths([str(p) for p in files], cache=cache, device="cpu")}
    for c in (None, cache):  # embedded on the fly (only block 1), and read from a cache holding blocks 0 and 1
        engine = Engine(det, cache=c, device="cpu")
        engine.load()
        items = [engine.prepare(p.name, p.read_bytes()) for p in files]
        assert all(it.cached for it in items) == (c is not None)
        rows = engine.run_batch(items)
        assert [r["error"] for r in rows] == [None] * 3
        for r in rows:
            assert r["score"] == pytest.approx(want[r["sha256"]], abs=1e-4)


def test_engine_scores_a_tile_detector_like_clipdet_score(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    """A detector fitted with --tiles: serve scores the tiles with its learned rule and image threshold."""
    from clipdet.score.tiles import score_tiles

    cache = str(tmp_path / "t.h5")
    det = clipdet.fit(list(map(str, [labelled_tree])), head="svm", shots=4, seed=0, cache=cache, tiles="64:3",
                      backbone=tiny_spec, attribute=False)
    det.save(tmp_path / "t.clipdet")
    det = Detector.load(tmp_path / "t.clipdet")
    cal = det.meta["tiles"]
    files = sorted((labelled_tree / "fake" / "genB").iterdir())[:3]
    refs = discover([str(p) for p in files])
    from clipdet.detectors.tiles import TileCalibration

    want = {r["sha256"]: r for r in score_tiles(refs, det, 64, 3, calibration=TileCalibration.from_meta(det.meta),
                                                cache=clipdet.cache.FeatureCache(cache), device="cpu")}
    engine = Engine(det, cache=cache, device="cpu")
    engine.load()
    assert engine.describe()["tiles"] == {"size": 64, "count": 3, "rule": cal["rule"], "threshold": cal["threshold"]}
    rows = engine.run_batch([engine.prepare(p.name, p.read_bytes()) for p in files])
    for r in rows:
        w = want[r["sha256"]]
        assert r["error"] is None and r["tile_rule"] == cal["rule"]
        assert r["score"] == pytest.approx(w["score"], abs=1e-4) and r["label"] == w["label"]
        assert (r["label"] == "fake") == (r["score"] >= cal["threshold"])
    with pytest.raises(clipdet.errors.UsageError, match="tiles"):
        engine.stability_option("1")
