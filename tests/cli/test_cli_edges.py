"""Edge cases a user hits: outputs never clobbered by a failed run, skipped references reported,
strict JSON, BOM manifests, unreadable shards kept, one-line errors for OS failures."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from clipdet.cache import FeatureCache
from clipdet.extract.discover import read_manifest


def test_failed_score_leaves_earlier_output_untouched(fitted, tmp_path, tiny_weights, run_cli, make_image):
    tree, cache, det = fitted
    out = tmp_path / "scores.csv"
    out.write_text("earlier results\n")
    make_image(tmp_path / "new" / "x.png", seed=77)  # not cached: needs the model
    moved = tmp_path / "gone.safetensors"
    shutil.copy(tiny_weights, moved)
    r = run_cli("score", str(tmp_path / "new"), "--detector", det, "--cache", cache, "--out", str(out),
                "--backbone", f"clipdet-tiny:{tmp_path / 'missing.safetensors'}")
    assert r.exit_code == 2 and "not found" in r.stderr and r.stderr.count("\n") == 1
    assert out.read_text() == "earlier results\n"
    r = run_cli("score", str(tmp_path / "new"), "--detector", det, "--cache", cache, "--out", str(tmp_path))
    assert r.exit_code == 2 and "is a folder" in r.stderr


def test_score_without_out_prints_csv_rows_and_summary_on_stderr(fitted, run_cli):
    tree, cache, det = fitted
    r = run_cli("score", str(tree / "fake"), "--detector", det, "--cache", cache)
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 16 and all(row["label"] in ("real", "fake") for row in rows)
    assert "16 images" in r.stderr


def test_fit_from_paths_reports_skipped_references(labelled_tree, tiny_spec, tmp_path, run_cli):
    (labelled_tree / "fake" / "genA" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    r = run_cli("fit", str(labelled_tree), "--backbone", tiny_spec, "--cache", str(tmp_path / "c.h5"),
                "--shots", "4", "--out", str(tmp_path / "d.clipdet"))
    assert r.exit_code == 1, r.stderr  # written, but a reference was skipped
    assert "skipped" in r.stderr and "broken.png" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "d.clipdet").exists()


def test_eval_json_is_strict_json_with_one_class(fitted, run_cli):
    tree, cache, det = fitted
    r = run_cli("eval", str(tree / "fake"), "--detector", det, "--cache", cache, "--exclude-references", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert res["metrics"]["auc"] is None and any("undefined" in n for n in res["notes"])


def test_manifest_with_byte_order_mark(tmp_path, make_image):
    make_image(tmp_path / "a.png", seed=1)
    (tmp_path / "m.csv").write_bytes("path,label,generator\na.png,fake,sdxl\n".encode("utf-8-sig"))
    refs = read_manifest(tmp_path / "m.csv")
    assert [(os.path.basename(r.path), r.label, r.generator) for r in refs] == [("a.png", "fake", "sdxl")]


def test_compaction_sets_aside_an_unreadable_shard(fitted, tmp_path):
    tree, cache, det = fitted
    fc = FeatureCache(cache)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a segment of a killed writer, never added to the catalogue, and damaged
    bad = os.path.join(fc.seg_dir, f"seg-00000000000000000001-{dead.pid}-000000.h5")
    with open(bad, "wb") as f:
        f.write(b"not hdf5 at all")
    before = fc.info()["images"]
    with pytest.warns(UserWarning, match="set aside"):
        fc.compact()
    assert os.path.exists(bad + ".bad") and not os.path.exists(bad)  # kept for a person, not deleted
    assert fc.info()["images"] == before


def test_read_only_cache_can_be_read(fitted, tmp_path, run_cli):
    tree, cache, det = fitted
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(cache, ro / "c.h5")
    shutil.copytree(cache + ".d", ro / "c.h5.d")
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: the folder stays writable")
        r = run_cli("cache", "info", "--cache", str(ro / "c.h5"))
        assert r.exit_code == 0 and "24 images" in r.stdout
    finally:
        os.chmod(ro, 0o755)
