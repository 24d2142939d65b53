"""Scoring on native-resolution tiles: tile views are cached like any view; scores aggregate per image."""

from __future__ import annotations

import numpy as np
import pytest

from clipdet.errors import UsageError
from clipdet.score.tiles import aggregate, parse_tiles


def test_parse_and_aggregate():
    assert parse_tiles("224:4") == (224, 4) and parse_tiles("64") == (64, 1)
    for bad in ("4:2", "224:0", "x"):
        with pytest.raises(UsageError, match="--tiles"):
            parse_tiles(bad)
    S = np.array([[0.0, 1.0, np.nan], [np.nan, np.nan, np.nan], [-1.0, 3.0, 1.0]])
    np.testing.assert_allclose(aggregate(S, "mean"), [0.5, np.nan, 1.0])
    np.testing.assert_allclose(aggregate(S, "max"), [1.0, np.nan, 3.0])
    np.testing.assert_allclose(aggregate(S, "mix:0.5"), [0.75, np.nan, 2.0])
    with pytest.raises(UsageError, match="mean, max, mix:W"):
        aggregate(S, "median")


def test_score_tiles_cli_aggregates_the_tile_views(fitted, run_cli, tmp_path):
    from clipdet.cache import FeatureCache
    from clipdet.detectors.detector import Detector
    from clipdet.extract.discover import discover
    from clipdet.score.stream import score_refs

    tree, cache, det_path = fitted
    out = tmp_path / "t.csv"
    r = run_cli("score", tree / "fake", "-d", det_path, "-c", cache, "--tiles", "64:3", "--tile-rule", "max",
                "-o", out)
    assert r.exit_code == 0, r.output
    import csv

    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 16
    det = Detector.load(det_path)
    refs = sorted(discover([str(tree / "fake")]), key=lambda x: x.path)
    fc = FeatureCache(cache)
    assert {g.view for g in fc.groups(count=False)} >= {"tile:64:0", "tile:64:1", "tile:64:2"}  # cached views
    per = [{x["path"]: x["score"] for x in score_refs(refs, det, cache=fc, view=f"tile:64:{k}")} for k in range(3)]
    got = {x["path"]: float(x["score"]) for x in rows}
    for p in got:
        assert got[p] == pytest.approx(max(v[p] for v in per), abs=1e-5)
