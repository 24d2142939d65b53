"""score --stability (perturbed views in memory, the unsure band) and the provenance column."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from marked_files import jpeg_with_xmp
from PIL import Image

from clipdet.cache import FeatureCache
from clipdet.detectors.detector import Detector
from clipdet.extract.discover import ImageRef, discover
from clipdet.score.output import COLUMNS
from clipdet.score.stability import DEFAULT_STABILITY_VIEWS, STABILITY_COLUMNS, judge, stability_views
from clipdet.score.stream import score_refs

VIEWS = "jpeg:75,resize:0.5"


def test_judge_flips_band_and_reasons():
    j = judge(1.0, {"jpeg:75": 2.0, "crop:224": -0.5}, 0.0, None)
    assert not j["stable"] and j["flips"] == "crop:224" and (j["score_min"], j["score_max"]) == (-0.5, 2.0)
    assert "from fake under crop:224" in j["unsure_reason"]
    j = judge(0.2, {"jpeg:75": 0.3}, 0.0, (-0.1, 0.5))
    assert j["stable"] and "unsure band [-0.1, 0.5)" in j["unsure_reason"]
    j = judge(0.6, {"jpeg:75": float("nan")}, 0.0, (-0.1, 0.5))  # a view that could not be made is ignored
    assert j["stable"] and j["unsure_reason"] == "" and j["score_max"] == 0.6


def test_stability_views_option():
    assert stability_views(None) == list(DEFAULT_STABILITY_VIEWS)
    assert stability_views("none") == [] and stability_views("") == []
    assert stability_views("jpeg:075, crop:224", detector_view="crop:224") == ["jpeg:75"]


def test_score_stability_rows_equal_scoring_each_view_and_nothing_cached(fitted, tmp_path, run_cli):
    tree, cache, det_path = fitted
    out = tmp_path / "s.csv"
    r = run_cli("score", str(tree / "fake"), str(tree / "real"), "--detector", det_path, "--cache", cache,
                "--out", str(out), "--stability", "--stability-views", VIEWS)
    assert r.exit_code == 0, r.stderr
    assert "change verdict under jpeg:75,resize:0.5" in r.stdout
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == COLUMNS + STABILITY_COLUMNS
    det = Detector.load(det_path)
    refs = discover([str(tree / "fake"), str(tree / "real")])
    # each view's score is exactly what scoring that view alone gives (one embedding path)
    per_view = {v: {x["path"]: x["score"] for x in score_refs(refs, det, cache=FeatureCache(cache, readonly=True),
                                                                view=v, provenance=False)}
                for v in VIEWS.split(",")}
    band = det.unsure_range()
    for row in rows:
        s = float(row["score"])
        views = {v: per_view[v][row["path"]] for v in per_view}
        allv = [s, *views.values()]
        assert float(row["score_min"]) == pytest.approx(min(allv), rel=1e-5)
        assert float(row["score_max"]) == pytest.approx(max(allv), rel=1e-5)
        flips = [v for v, x in views.items() if (x >= det.threshold) != (s >= det.threshold)]
        assert row["flips"] == ",".join(flips) and row["stable"] == ("false" if flips else "true")
        in_band = band is not None and band[0] <= s < band[1]
        assert (row["label"] == "unsure") == bool(flips or in_band) == bool(row["unsure_reason"])
        if row["label"] != "unsure":
            assert row["label"] == ("fake" if s >= det.threshold else "real")
    # perturbed views were embedded in memory only: the cache holds the clean view alone
    assert {g.view for g in FeatureCache(cache).groups(count=False)} == {"clean"}
    r = run_cli("score", str(tree / "real"), "--detector", det_path, "--cache", cache, "--out",
                str(tmp_path / "k.csv"), "--stability", "--stability-views", "jpeg:75", "--stability-cache")
    assert r.exit_code == 0, r.stderr
    assert {g.view for g in FeatureCache(cache).groups(count=False)} == {"clean", "jpeg:75"}


def test_stability_reads_no_labels(fitted, tmp_path):
    tree, cache, det_path = fitted
    det = Detector.load(det_path)
    refs = discover([str(tree / "fake" / "genA")])
    unlabelled = [ImageRef(r.path) for r in refs]
    relabelled = [ImageRef(r.path, label="real") for r in refs]
    kw = dict(cache=FeatureCache(cache, readonly=True), stability=["jpeg:75"], provenance=False)
    a, b, c = (list(score_refs(x, det, **kw)) for x in (refs, unlabelled, relabelled))
    assert a == b == c


def test_stability_usage_errors(fitted, run_cli):
    tree, cache, det_path = fitted
    r = run_cli("score", str(tree / "real"), "--detector", det_path, "--cache", cache, "--stability-cache")
    assert r.exit_code == 2 and "give --stability too" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("score", str(tree / "real"), "--detector", det_path, "--stability", "--stability-views", "jpg:3")
    assert r.exit_code == 2 and "unknown view" in r.stderr


def test_provenance_column_never_in_the_score(fitted, tmp_path, run_cli):
    tree, cache, det_path = fitted
    src = sorted((tree / "fake" / "genA").glob("*.png"))[0]
    pixels = Image.open(src).convert("RGB")
    d = tmp_path / "marked"
    d.mkdir()
    plain = d / "plain.png"
    pixels.save(plain)
    pixels.save(d / "webui.png", pnginfo=_info({"parameters": "x\nSteps: 20, Model: sd_xl_base_1.0"}))
    jpeg_with_xmp(d / "x.jpg")
    out = tmp_path / "p.jsonl"
    r = run_cli("score", str(d), "--detector", det_path, "--cache", cache, "--out", str(out))
    assert r.exit_code == 0, r.stderr
    rows = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert rows["webui.png"]["provenance"] == "png:parameters (sd_xl_base_1.0)"
    assert rows["webui.png"]["provenance_details"]["marks"][0]["front_end"] == "Stable Diffusion WebUI"
    assert rows["x.jpg"]["provenance"] == "xmp:trainedAlgorithmicMedia"
    assert rows["plain.png"]["provenance"] is None and rows["plain.png"]["provenance_details"] is None
    # same pixels, different marks: the same score
    assert rows["webui.png"]["sha256"] != rows["plain.png"]["sha256"]
    assert math.isclose(rows["webui.png"]["score"], rows["plain.png"]["score"], rel_tol=1e-6)
    # files known unchanged (not read again) still get their marks; CSV keeps the short value only
    r = run_cli("score", str(d), "--detector", det_path, "--cache", cache, "--out", str(tmp_path / "p.csv"))
    text = (tmp_path / "p.csv").read_text()
    again = {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(io.StringIO(text))}
    assert again["webui.png"]["provenance"] == "png:parameters (sd_xl_base_1.0)"
    assert "provenance_details" not in again["webui.png"]
    r = run_cli("score", str(d), "--detector", det_path, "--cache", cache, "--out", str(tmp_path / "n.csv"),
                "--no-provenance")
    assert all(row["provenance"] == "" for row in csv.DictReader(io.StringIO((tmp_path / "n.csv").read_text())))


def _info(texts):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    return info
