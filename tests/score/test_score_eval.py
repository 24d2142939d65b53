"""clipdet score and clipdet eval: streaming rows, bad files, formats, overlap refusal, metrics, report."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_tree
from PIL import Image

from clipdet.detectors.detector import Detector
from clipdet.errors import OverlapError
from clipdet.evaluate.metrics import roc_auc
from clipdet.evaluate.run import evaluate, per_generator_auc, write_report
from clipdet.extract.discover import discover
from clipdet.score.output import COLUMNS, RowWriter
from clipdet.score.stream import score_refs


@pytest.fixture
def fitted(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    """(tree, cache path, detector path): a knn detector fitted on 4+4 references of the tree."""
    cache, path = fit_tree(labelled_tree, tiny_spec, tiny_backbone, tmp_path, head="knn")
    return labelled_tree, cache, path


def test_score_folder_with_bad_file_streams_stable_rows(fitted, tmp_path, run_cli, make_image):
    tree, cache, det_path = fitted
    new = tmp_path / "incoming"
    (new / "sub").mkdir(parents=True)
    make_image(new / "b_new.png", size=(90, 70), seed=41)
    make_image(new / "sub" / "a_new.jpg", size=(120, 80), seed=42, fake=True)
    (new / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "scores.csv"
    r = run_cli("score", str(new), str(tree / "real"), "--detector", str(det_path), "--cache", cache,
                "--out", str(out))
    assert r.exit_code == 1, r.stderr  # some files failed
    assert "c_broken.png" in r.stderr and "Traceback" not in r.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0].keys()) == COLUMNS
    paths = [row["path"] for row in rows]
    expected = [str(p) for p in [new / "b_new.png", new / "c_broken.png", new / "sub" / "a_new.jpg"]]
    expected += [str(p) for p in sorted((tree / "real" / "a").iterdir())]
    assert paths == expected  # input order, each folder walked in sorted order
    bad = rows[1]
    assert bad["error"] and bad["label"] == "unknown" and bad["score"] == "" and bad["sha256"]
    good = [row for row in rows if not row["error"]]
    assert all(row["label"] in ("real", "fake") and 0 <= float(row["p_fake"]) <= 1 for row in good)
    assert all(row["nearest_path"] and row["nearest_label"] in ("real", "fake") for row in good)  # knn
    assert "2 could not" not in r.stdout and "could not be read" in r.stdout
    # the new images were added to the cache; scoring again gives the same rows and exit code
    r2 = run_cli("score", str(new), str(tree / "real"), "--detector", str(det_path), "--cache", cache,
                 "--out", str(tmp_path / "again.csv"))
    assert r2.exit_code == 1
    assert out.read_text() == (tmp_path / "again.csv").read_text()


def test_score_jsonl_stdout_and_single_image_verdict(fitted, tmp_path, run_cli):
    tree, cache, det_path = fitted
    out = tmp_path / "s.jsonl"
    r = run_cli("score", str(tree), "--detector", str(det_path), "--cache", cache, "--out", str(out))
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) >= {"path", "sha256", "score", "p_fake", "label", "error"}
    y = np.array([1 if "/fake/" in row["path"] else 0 for row in rows])
    assert roc_auc(y, np.array([row["score"] for row in rows])) > 0.9
    r = run_cli("score", str(tree), "--detector", str(det_path), "--cache", cache, "--out", "-")
    lines = list(csv.reader(io.StringIO(r.stdout)))
    assert lines[0] == COLUMNS and len(lines) == 25
    one = sorted((tree / "fake" / "genA").iterdir())[0]
    r = run_cli("score", str(one), "--detector", str(det_path), "--cache", cache)
    assert r.exit_code == 0 and r.stdout.startswith(str(one)) and "p_fake" in r.stdout
    assert "threshold" in r.stdout and "nearest reference" in r.stdout


def test_score_streams_in_chunks_and_writer_flushes(fitted, tmp_path):
    tree, cache, det_path = fitted
    det = Detector.load(det_path)
    refs = discover([str(tree)])
    gen = score_refs(refs, det, cache=cache, chunk=5)
    first = next(gen)  # rows come before the whole folder is done
    assert first["path"] == refs[0].path
    rest = list(gen)
    assert [r["path"] for r in [first, *rest]] == [r.path for r in refs]
    w = RowWriter(str(tmp_path / "partial.csv"))
    w.write(first)
    w.flush()
    assert len((tmp_path / "partial.csv").read_text().splitlines()) == 2  # header + row, on disk already
    w.close()


def test_eval_refuses_overlap_and_reports_metrics(fitted, tmp_path, run_cli):
    tree, cache, det_path = fitted
    det = Detector.load(det_path)
    refs = discover([str(tree)])
    with pytest.raises(OverlapError, match="8 evaluation image"):
        evaluate(refs, det, cache=cache)
    r = run_cli("eval", str(tree), "--detector", str(det_path), "--cache", cache)
    assert r.exit_code == 2 and "--exclude-references" in r.stderr and r.stderr.count("\n") == 1
    res = evaluate(refs, det, cache=cache, exclude_references=True)
    m = res["metrics"]
    assert m["n"] == 16 and m["n_real"] == 4 and m["n_fake"] == 12
    assert res["overlap"] == {"count": 8, "policy": "excluded"}
    assert set(res["per_generator_auc"]) == {"genA", "genB"}
    assert m["auc"] > 0.9 and 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 1
    assert "attribution" in res and res["attribution"]["labels"][0] == "real"
    kept = evaluate(refs, det, cache=cache, allow_overlap=True)
    assert kept["metrics"]["n"] == 24 and any("optimistic" in n for n in kept["notes"])


def test_eval_report_files_are_images_and_json(fitted, tmp_path, run_cli):
    tree, cache, det_path = fitted
    rep = tmp_path / "report"
    r = run_cli("eval", str(tree), "--detector", str(det_path), "--cache", cache, "--exclude-references",
                "--views", "jpeg:75,blur:1.0", "--report", str(rep), "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["robustness"]) == {"clean", "jpeg:75", "blur:1"}
    text = (rep / "report.md").read_text()
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert {"roc.png", "scores.png", "per_generator_auc.png", "robustness.png", "attribution.png"} <= set(pngs)
    for name in pngs:
        assert f"]({name})" in text
        with Image.open(rep / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    assert json.loads((rep / "metrics.json").read_text())["metrics"]["n"] == 16


def test_per_generator_auc_by_hand():
    y = np.array([0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.5, 0.9, 0.3, 0.6, 0.05])
    gens = ["", "", "a", "a", "b", "b"]
    got = per_generator_auc(y, s, gens)
    # a: fakes 0.9, 0.3 vs reals 0.1, 0.5 → pairs won 2 + 1 of 4; b: 0.6, 0.05 → 2 + 0 of 4
    assert got == {"a": 0.75, "b": 0.5}


def test_write_report_without_optional_sections(tmp_path):
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    res = {"metrics": {"auc": 0.75}, "_curves": {"clean": (y, s)}, "per_generator_auc": {},
           "detector": {"head": "svm", "backbone": "x:random", "view": "clean", "shots": 1, "seed": 0,
                        "threshold": 0.5, "target_fpr": 0.05},
           "n_inputs": 4, "n_unlabelled": 0, "n_errors": 0, "overlap": {"count": 0, "policy": "none"}, "notes": []}
    path = write_report(res, str(tmp_path / "r"))
    assert Path(path).read_text().startswith("# clipdet evaluation")
    assert (tmp_path / "r" / "roc.png").stat().st_size > 1000
