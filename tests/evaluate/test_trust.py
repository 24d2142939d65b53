"""eval --stability (coverage, accuracy on decided images, unsure rates) and provenance reported apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fit_tree
from PIL import Image, PngImagePlugin

from clipdet.evaluate.trust import provenance_note, provenance_report, trust_report


def test_trust_report_by_hand():
    rows = [{"label": "real", "flips": ""}, {"label": "unsure", "flips": "jpeg:75"},
            {"label": "fake", "flips": ""}, {"label": "real", "flips": ""}, {"label": "unsure", "flips": ""}]
    y = np.array([0, 0, 1, 1, 1])
    t = trust_report(rows, y, ["", "", "a", "a", "b"], views=["jpeg:75", "crop:224"])
    assert t["coverage"] == 0.6 and t["accuracy_decided"] == pytest.approx(2 / 3)
    assert t["unsure_rate"] == 0.4 and t["unsure_real"] == 0.5 and t["unsure_per_generator"] == {"a": 0.0, "b": 1.0}
    assert t["flip_rate"] == 0.2 and t["band_only_rate"] == 0.2
    assert t["flip_rate_per_view"] == {"jpeg:75": 0.2, "crop:224": 0.0}


def test_provenance_report_by_hand():
    mark = {"marks": [{"source": "png"}], "ai": True}
    rows = [{"provenance_details": None}, {"provenance_details": None},
            {"provenance_details": mark}, {"provenance_details": {"marks": [{"source": "xmp"}], "ai": False}}]
    rep = provenance_report(rows, np.array([0, 0, 1, 1]), ["", "", "a", "b"])
    assert rep["real"] == {"n": 2, "marked": 0, "ai_marked": 0, "by_source": {}}
    assert rep["fake"] == {"n": 2, "marked": 2, "ai_marked": 1, "by_source": {"png": 1, "xmp": 1}}
    assert rep["per_generator"]["a"]["ai_marked"] == 1
    assert "shortcut" in provenance_note(rep)
    same = provenance_report(rows[:2] + rows[:2], np.array([0, 0, 1, 1]), ["", "", "a", "a"])
    assert provenance_note(same) is None


def test_eval_stability_and_provenance(labelled_tree, tiny_spec, tiny_backbone, tmp_path, run_cli):
    cache, det_path = fit_tree(labelled_tree, tiny_spec, tiny_backbone, tmp_path)
    src = sorted((labelled_tree / "fake" / "genA").glob("*.png"))[0]
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Model: sd15")
    Image.open(src).convert("RGB").save(labelled_tree / "fake" / "genA" / "marked.png", pnginfo=info)
    base = ["eval", str(labelled_tree), "--detector", str(det_path), "--cache", cache, "--exclude-references",
            "--json"]
    plain = run_cli(*base)
    assert plain.exit_code == 0, plain.stderr
    r = run_cli(*base, "--stability", "--stability-views", "jpeg:75,crop:224", "--report", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.stderr
    a, b = json.loads(plain.stdout), json.loads(r.stdout)
    assert a["metrics"]["auc"] == b["metrics"]["auc"] and "trust" not in a  # the AUC is the scores', unchanged
    t = b["trust"]
    assert t["n"] == b["metrics"]["n"] and t["coverage"] == pytest.approx(1 - t["unsure_rate"])
    assert set(t["flip_rate_per_view"]) == {"jpeg:75", "crop:224"} and set(t["unsure_per_generator"]) == {"genA",
                                                                                                          "genB"}
    pv = b["provenance"]
    assert pv["fake"]["marked"] == 1 and pv["real"]["marked"] == 0 and pv["per_generator"]["genA"]["ai_marked"] == 1
    assert any("shortcut" in n for n in b["notes"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Verdicts you can trust" in text and "## Provenance marks (not used in any metric)" in text
    human = run_cli(*base[:-1], "--stability")
    assert "stability (jpeg:75,resize:0.5,crop:224): coverage" in human.stdout
    assert "provenance marks (not in any metric): real 0/" in human.stdout


def test_bench_counts_provenance_apart_and_never_fits_on_it(tmp_path):
    from marked_files import jpeg_with_xmp

    from clipdet.evaluate import bench
    from clipdet.fit.pools import Pool

    rng = np.random.default_rng(0)
    n = 12
    paths = []
    for i in range(2 * n):
        p = tmp_path / f"f{i}.jpg"
        if i >= n and i % 2:  # half the fakes carry an XMP DigitalSourceType
            jpeg_with_xmp(p)
        else:
            Image.new("RGB", (16, 16), (i, 0, 0)).save(p)
        paths.append(str(p))
    paths[1] = str(tmp_path / "gone.jpg")  # a real whose file has moved
    X = rng.normal(size=(2 * n, 8)).astype(np.float32)
    X[n:, 0] += 2
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    pool = Pool([f"{i:064x}" for i in range(2 * n)], ["real"] * n + ["fake"] * n, [""] * n + ["g1"] * n, paths, X)
    kw = dict(protocols="kshot", heads="centroid", ks=[2], seeds=2)
    with_marks = bench.run_bench({"clean": pool}, provenance=True, **kw)
    without = bench.run_bench({"clean": pool}, **kw)
    def strip(rows):
        return [{k: v for k, v in r.items() if "second" not in k} for r in rows]

    assert strip(with_marks.kshot) == strip(without.kshot) and without.provenance == {}
    pv = with_marks.provenance
    assert pv["fake"]["marked"] == n // 2 and pv["real"]["marked"] == 0 and pv["real"]["unread"] == 1
    assert any("shortcut" in note for note in with_marks.notes)
    bench.write_bench(with_marks, tmp_path / "out")
    assert "Provenance marks (not used in any fit or AUC)" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["provenance"]["fake"]["ai_marked"] == n // 2
