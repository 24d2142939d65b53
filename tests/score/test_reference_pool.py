"""Issue 21: scoring or evaluating a labelled folder never adds its images to the reference pool (only
`clipdet extract` and `fit PATH` do), and `cache info` says what the pool holds."""

from __future__ import annotations

import clipdet
from clipdet.cache import FeatureCache


def _folder(root, make_image, gen: str, base: int):
    for i in range(3):
        make_image(root / "real" / f"r{i}.png", size=(56, 48), seed=base + i)
        make_image(root / "fake" / gen / f"f{i}.png", size=(56, 48), seed=base + 50 + i, fake=True)
    return root


def test_score_and_eval_record_their_images_unlabelled(fitted, tmp_path, make_image, run_cli):
    tree, cache, det = fitted
    before = clipdet.fit(head="centroid", shots="all", seed=0, cache=cache).meta["candidates"]
    scored = _folder(tmp_path / "scored", make_image, "genC", 500)
    evaluated = _folder(tmp_path / "evaluated", make_image, "genD", 600)
    r = run_cli("score", scored, "--detector", det, "--cache", cache, "--out", tmp_path / "s.csv", "-q")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", evaluated, "--detector", det, "--cache", cache, "-q")
    assert r.exit_code == 0, r.output
    info = next(f for f in FeatureCache(cache).info()["features"] if f["view"] == "clean")
    assert info["labels"].get("unlabelled") == 12 and set(info["generators"]) == {"genA", "genB"}
    after = clipdet.fit(head="centroid", shots="all", seed=0, cache=cache)
    assert after.meta["candidates"] == before
    assert not {"genC", "genD"} & set(after.meta["generators"] or [])
    r = run_cli("cache", "info", "--cache", cache)
    assert r.exit_code == 0, r.output
    assert "reference pool" in r.stdout and "24 labelled images" in r.stdout and "12 unlabelled" in r.stdout
    # the images are cached all the same: scoring them again embeds nothing
    r = run_cli("score", scored, "--detector", det, "--cache", cache, "--cache-readonly", "--out",
                tmp_path / "again.csv", "-q")
    assert r.exit_code == 0 and (tmp_path / "again.csv").read_text() == (tmp_path / "s.csv").read_text()
