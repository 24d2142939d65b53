"""Cache tools: import/export (Parquet, clip-retrieval), verify/repair, conflicts, v1 upgrade,
read-only caches and a full disk."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import h5py
import numpy as np
import pytest
from conftest import hex_sha as _sha
from conftest import unit_rows as _unit

from clipdet.cache import DiskFullError, FeatureCache, FeatureRows, ImageMeta
from clipdet.cache import files as files_mod

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def dim(tiny_spec):
    from clipdet.backbones.attrs import backbone_attrs

    return backbone_attrs(tiny_spec)[1]["dim"]


def test_import_parquet_good_and_bad_rows_then_export_round_trip(tmp_path, tiny_spec, dim, run_cli):
    x = _unit(6, dim)
    x[3] = np.nan
    x[4] = 0
    rows = [list(map(float, r)) for r in x]
    rows[5] = rows[5][:-1]  # wrong dimension
    table = pa.table({
        "sha256": [_sha(1), _sha(2), "not-a-sha", _sha(4), _sha(5), _sha(6)],
        "embedding": rows, "label": ["real", "1", "fake", "0", "real", "fake"],
        "generator": ["", "sdxl", "", "", "", ""],
    })
    dup = pa.table({"sha256": [_sha(1), _sha(7), _sha(8)], "embedding": [list(map(float, r)) for r in _unit(3, dim, 1)],
                    "label": ["real", "maybe", "fake"]})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(dup, tmp_path / "b.parquet")
    cache = tmp_path / "c.h5"
    r = run_cli("cache", "import", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "-b", tiny_spec,
                "-c", str(cache))
    assert r.exit_code == 1, r.output
    assert "imported 3 row(s), rejected 6" in r.stdout
    err = r.stderr
    for why in ("not 64 hex", "NaN/inf or is all zeros", f"not {dim} numbers", "duplicate sha256", "'maybe'"):
        assert why in err, err
    assert "a.parquet row" in err and "Traceback" not in err
    fc = FeatureCache(cache)
    key = fc.groups()[0].key
    assert fc.cached_shas(key, "clean") == {_sha(1), _sha(2), _sha(8)}
    got = fc.load(key, "clean", shas=[_sha(1), _sha(2)])
    np.testing.assert_allclose(got.embedding, x[:2], atol=2e-3)
    metas = fc.image_metas([_sha(2)])
    assert (metas[_sha(2)].label, metas[_sha(2)].generator) == ("fake", "sdxl")
    out = tmp_path / "out.parquet"
    r = run_cli("cache", "export", "--format", "parquet", str(out), "-c", str(cache))
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.column_names == ["sha256", "embedding", "label", "generator", "path"]
    assert set(t.column("sha256").to_pylist()) == {_sha(1), _sha(2), _sha(8)}
    # re-importing the export into a fresh cache gives the same rows
    fc2 = FeatureCache(tmp_path / "d.h5")
    r = run_cli("cache", "import", str(out), "-b", tiny_spec, "-c", fc2.path)
    assert r.exit_code == 0, r.output
    a, b = fc.load(key, "clean"), fc2.load(key, "clean")
    order = [b.sha256.index(s) for s in a.sha256]
    np.testing.assert_array_equal(a.embedding, b.embedding[order])


def test_import_wrong_dimension_names_it(tmp_path, tiny_spec, dim, run_cli):
    pq.write_table(pa.table({"sha256": [_sha(1)], "embedding": [[0.5] * (dim + 3)]}), tmp_path / "w.parquet")
    r = run_cli("cache", "import", str(tmp_path / "w.parquet"), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"))
    assert r.exit_code == 1 and f"not {dim} numbers" in r.stderr
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    r = run_cli("cache", "import", str(tmp_path / "bad.parquet"), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"))
    assert r.exit_code == 2 and "needs columns embedding and sha256 or path" in r.stderr


def test_import_clip_retrieval_folder_hashes_paths(tmp_path, tiny_spec, dim, make_image, run_cli):
    import hashlib

    imgs = [make_image(tmp_path / "img" / f"{i}.png", seed=i) for i in range(3)]
    root = tmp_path / "cr"
    (root / "embeddings" / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "embeddings" / "img_emb" / "img_emb_0.npy", _unit(3, dim).astype(np.float16))
    pq.write_table(pa.table({"image_path": [str(p) for p in imgs]}), root / "metadata" / "metadata_0.parquet")
    r = run_cli("cache", "import", str(root), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"))
    assert r.exit_code == 0, r.output
    fc = FeatureCache(tmp_path / "c.h5")
    want = {hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in imgs}
    assert fc.cached_shas(fc.groups()[0].key, "clean") == want


def _write_v1(path, key, n=4, dim=8):
    """A cache as clipdet 0.1 wrote it (format v1: strings, one main file)."""
    sd = h5py.string_dtype("utf-8")
    x = _unit(n, dim, 3)
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"], f.attrs["clipdet_version"] = "clipdet-cache", 1, "0.1.0"
        im = f.create_group("images")
        im.create_dataset("sha256", data=np.array([_sha(i).encode() for i in range(n)], "S64"))
        im.create_dataset("label", data=["real", "fake", "fake", ""][:n], dtype=sd)
        im.create_dataset("generator", data=["", "sdxl", "dalle", ""][:n], dtype=sd)
        im.create_dataset("format", data=["PNG"] * n, dtype=sd)
        im.create_dataset("paths", data=[f"/x/{i}.png" for i in range(n)], dtype=sd)
        im.create_dataset("width", data=np.arange(n, dtype=np.int32))
        im.create_dataset("height", data=np.arange(n, dtype=np.int32))
        e = f.create_group("errors")
        for c in ("sha256", "path", "reason"):
            e.create_dataset(c, data=["x"], dtype=sd)
        g = f.create_group(f"features/{key}/clean")
        g.attrs["backbone"] = json.dumps({"spec": "a:b", "arch": "a", "weights_id": "w", "preprocess": {}})
        g.attrs["layers"], g.attrs["dim"] = "[]", dim
        g.create_dataset("sha256", data=np.array([_sha(i).encode() for i in range(n)], "S64"))
        g.create_dataset("embedding", data=x.astype(np.float16))
    return x


def test_v1_cache_read_then_upgraded(tmp_path, run_cli):
    path = str(tmp_path / "old.h5")
    x = _write_v1(path, "K")
    fc = FeatureCache(path)
    assert fc.info()["format_version"] == 1
    np.testing.assert_array_equal(fc.load("K", "clean").embedding, x.astype(np.float16).astype(np.float32))
    assert fc.image_metas([_sha(1)])[_sha(1)].generator == "sdxl"
    before = pathlib.Path(path).read_bytes()
    r = run_cli("cache", "upgrade", "-c", path)
    assert r.exit_code == 0 and "converted from v1" in r.stdout, r.output
    fc = FeatureCache(path)
    info = fc.info()
    assert info["format_version"] == 2 and info["segments"] == 1 and info["images"] == 4 and info["errors"] == 1
    np.testing.assert_array_equal(fc.load("K", "clean").embedding, x.astype(np.float16).astype(np.float32))
    assert fc.image_metas([_sha(2)])[_sha(2)].generator == "dalle"
    assert pathlib.Path(path).read_bytes() != before  # the catalogue replaced it


def test_failed_upgrade_leaves_v1_file_untouched(tmp_path, monkeypatch):
    path = str(tmp_path / "old.h5")
    _write_v1(path, "K")
    before = pathlib.Path(path).read_bytes()
    from clipdet.cache import merge

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "merge_files", boom)
    with pytest.raises(DiskFullError, match="no space left on device"):
        FeatureCache(path).compact(full=True)
    assert pathlib.Path(path).read_bytes() == before
    assert not [n for n in os.listdir(tmp_path / "old.h5.d") if n.startswith("mrg-") or n.endswith(".tmp")]


def test_readonly_cache_keeps_new_rows_in_memory(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5", readonly=True)
    rows = FeatureRows([_sha(1)], _unit(1, 8))
    attrs = {"backbone": {"spec": "a"}, "layers": [], "dim": 8}
    assert fc.write_shard({("K", "clean"): (rows, attrs)}, images=[ImageMeta(_sha(1), "real")]) is None
    assert fc.cached_shas("K", "clean") == {_sha(1)} and fc.load("K", "clean").sha256 == [_sha(1)]
    assert not os.listdir(tmp_path)  # nothing written


def test_full_disk_is_one_clean_error_and_keeps_earlier_batches(tmp_path, monkeypatch):
    fc = FeatureCache(tmp_path / "c.h5")
    attrs = {"backbone": {"spec": "a"}, "layers": [], "dim": 8}
    fc.write_shard({("K", "clean"): (FeatureRows([_sha(1)], _unit(1, 8)), attrs)})
    real_write = os.write

    class Full:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod, "os", Full())
    with pytest.raises(DiskFullError) as ei:
        fc.write_shard({("K", "clean"): (FeatureRows([_sha(2)], _unit(1, 8, 2)), attrs)})
    msg = str(ei.value)
    assert "no space left on device" in msg and fc.seg_dir in msg and "\n" not in msg
    monkeypatch.undo()
    assert not [n for n in os.listdir(fc.seg_dir) if n.endswith(".tmp")]  # partial temp file removed
    assert FeatureCache(fc.path).cached_shas("K", "clean") == {_sha(1)}
    fc.write_shard({("K", "clean"): (FeatureRows([_sha(2)], _unit(1, 8, 2)), attrs)})  # space back: goes on
    assert FeatureCache(fc.path).cached_shas("K", "clean") == {_sha(1), _sha(2)}


def test_merge_fails_early_without_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    fc = FeatureCache(tmp_path / "c.h5")
    attrs = {"backbone": {"spec": "a"}, "layers": [], "dim": 8}
    for i in range(3):
        fc.write_shard({("K", "clean"): (FeatureRows([_sha(i)], _unit(1, 8, i)), attrs)})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(DiskFullError, match="needs about"):
        fc.compact(full=True)
    assert len(fc.segments()) == 3


def test_verify_finds_and_repairs_bit_rot(tmp_path, run_cli):
    fc = FeatureCache(tmp_path / "c.h5")
    attrs = {"backbone": {"spec": "a"}, "layers": [], "dim": 8}
    p = fc.write_shard({("K", "clean"): (FeatureRows([_sha(i) for i in range(3)], _unit(3, 8)), attrs)})
    fc.write_shard({("K", "clean"): (FeatureRows([_sha(9)], _unit(1, 8, 9)), attrs)})
    r = run_cli("cache", "verify", "-c", fc.path)
    assert r.exit_code == 0 and "0 damaged row(s)" in r.stdout, r.output
    with h5py.File(p, "r") as f:
        off = f["features/K/clean/embedding"].id.get_chunk_info(0).byte_offset
    with open(p, "r+b") as f:
        f.seek(off + 4)
        f.write(b"\xff\xff")
    r = run_cli("cache", "verify", "-c", fc.path)
    assert r.exit_code == 1 and "3 damaged row(s)" in r.stdout and "damaged row" in r.stderr, r.output
    r = run_cli("cache", "verify", "--repair", "-c", fc.path)
    assert r.exit_code == 0 and "repaired 1 segment" in r.stdout, r.output
    fresh = FeatureCache(fc.path)
    assert fresh.cached_shas("K", "clean") == {_sha(9)}
    assert run_cli("cache", "verify", "-c", fc.path).exit_code == 0


def test_conflicting_labels_excluded_from_fit_and_listed(tmp_path, tiny_spec, make_image, run_cli):
    tree = tmp_path / "data"
    for i in range(4):
        make_image(tree / "real" / f"r{i}.png", seed=i)
        make_image(tree / "fake" / "g" / f"f{i}.png", seed=100 + i)
    import shutil

    shutil.copy(tree / "real" / "r0.png", tree / "fake" / "g" / "same-bytes.png")  # real AND fake
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", str(tree), "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 0, r.output
    r = run_cli("cache", "conflicts", "-c", cache)
    assert r.exit_code == 1 and "r0.png" in r.stdout and "same-bytes.png" in r.stdout, r.output
    with pytest.warns(UserWarning, match="1 image.*conflicting labels left out"):
        r = run_cli("fit", "--shots", "all", "-c", cache, "--out", str(tmp_path / "d.clipdet"), "-q")
    assert r.exit_code == 0, r.output
    from clipdet.detectors.detector import Detector

    det = Detector.load(tmp_path / "d.clipdet")
    import hashlib

    same = hashlib.sha256((tree / "real" / "r0.png").read_bytes()).hexdigest()
    assert same not in det.meta["reference_sha256"] and len(det.meta["reference_sha256"]) == 7
    # the same two files given to fit PATH are also left out, naming both
    with pytest.warns(UserWarning, match="conflicting labels.*same-bytes.png as fake/g.*r0.png as real"):
        r = run_cli("fit", str(tree), "--shots", "all", "-b", tiny_spec, "-c", cache,
                    "--out", str(tmp_path / "e.clipdet"), "-q")
    assert r.exit_code == 0, r.output


def test_score_reextracts_damaged_cached_rows(tmp_path, tiny_spec, make_image, run_cli):
    """One cached embedding damaged (NaN) breaks nothing: that image is re-embedded and scored."""
    tree = tmp_path / "data"
    for i in range(4):
        make_image(tree / "real" / f"r{i}.png", seed=i)
        make_image(tree / "fake" / "g" / f"f{i}.png", seed=100 + i)
    cache = str(tmp_path / "c.h5")
    det = str(tmp_path / "d.clipdet")
    assert run_cli("fit", str(tree), "-b", tiny_spec, "-c", cache, "--shots", "all", "--out", det, "-q").exit_code == 0
    out1 = tmp_path / "a.csv"
    assert run_cli("score", str(tree), "-d", det, "-c", cache, "--out", str(out1), "-q").exit_code == 0
    fc = FeatureCache(cache)
    fc.compact(full=True)
    seg = fc.segments()[0]
    key = fc.groups()[0].key
    with h5py.File(seg, "r+") as f:  # bit rot that keeps the checksum valid: a NaN written in place
        ds = f[f"features/{key}/clean/embedding"]
        row = ds[0]
        row[3] = np.nan
        ds[0] = row
    out2 = tmp_path / "b.csv"
    with pytest.warns(UserWarning) as caught:
        r = run_cli("score", str(tree), "-d", det, "-c", cache, "--out", str(out2), "-q")
    msgs = [str(w.message) for w in caught]
    assert any("1 cached feature row(s) damaged" in m for m in msgs), msgs
    assert any("cached features damaged, re-extracted" in m for m in msgs), msgs
    assert r.exit_code == 0, r.output
    import csv

    a = {row["sha256"]: row for row in csv.DictReader(out1.read_text().splitlines())}
    b = {row["sha256"]: row for row in csv.DictReader(out2.read_text().splitlines())}
    assert set(a) == set(b) and not any(row["error"] for row in b.values())
    for s in a:
        assert abs(float(a[s]["score"]) - float(b[s]["score"])) < 1e-3


def test_eval_excludes_conflicting_images_and_counts_them(tmp_path, tiny_spec, make_image, run_cli):
    import shutil

    refs, test = tmp_path / "refs", tmp_path / "test"
    for i in range(4):
        make_image(refs / "real" / f"r{i}.png", seed=i)
        make_image(refs / "fake" / "g" / f"f{i}.png", seed=100 + i)
        make_image(test / "real" / f"r{i}.png", seed=200 + i)
        make_image(test / "fake" / "g" / f"f{i}.png", seed=300 + i)
    shutil.copy(test / "real" / "r0.png", test / "fake" / "g" / "dup.png")
    cache, det = str(tmp_path / "c.h5"), str(tmp_path / "d.clipdet")
    assert run_cli("fit", str(refs), "-b", tiny_spec, "-c", cache, "--shots", "all", "--out", det, "-q").exit_code == 0
    with pytest.warns(UserWarning, match="conflicting labels"):
        r = run_cli("eval", str(test), "-d", det, "-c", cache, "--json", "-q")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_conflicting"] == 1 and any("conflicting labels were excluded" in n for n in res["notes"])
    assert (res["metrics"]["n_real"], res["metrics"]["n_fake"]) == (3, 4)  # r0 and its copy dropped
    assert res["per_generator_n"] == {"g": 4} and res["generators_not_evaluated"] == []


@pytest.mark.parametrize("per_generator", [False, True])
def test_sampling_from_index_equals_the_whole_pool_draw(tmp_path, per_generator):
    """fit's index-based draw reproduces the 0.1 draw (whole pool + sample_shots) row for row, and
    does not depend on how the cache is split into segments."""
    from clipdet.fit.pools import load_pool, sample_from_cache
    from clipdet.fit.shots import sample_shots

    fc = FeatureCache(tmp_path / "c.h5")
    attrs = {"backbone": {"spec": "a"}, "layers": [], "dim": 8}
    rng = np.random.default_rng(0)
    gens = ["", "sd", "mj", "dalle"]
    for b in range(12):
        shas = [hashlib_sha(f"{b}-{i}") for i in range(int(rng.integers(5, 30)))]
        labels = rng.choice(["real", "fake", ""], size=len(shas), p=[0.45, 0.45, 0.1])
        metas = [ImageMeta(s, lab, gens[int(rng.integers(0, 4))] if lab == "fake" else "")
                 for s, lab in zip(shas, labels)]
        fc.write_shard({("K", "clean"): (FeatureRows(shas, _unit(len(shas), 8, b)), attrs)}, images=metas)
    for k, seed in ((3, 0), (7, 5), (None, 1)):
        whole = load_pool(fc, "K", "clean")
        old = whole.take(sample_shots(whole.label, whole.generator, k, seed, per_generator, keys=whole.sha256))
        new, counts = sample_from_cache(fc, "K", "clean", k, seed, per_generator)
        assert new.sha256 == old.sha256 and new.label == old.label and new.generator == old.generator
        np.testing.assert_array_equal(new.X, old.X)
        from clipdet.fit.shots import candidate_counts

        assert counts == candidate_counts(whole.label, whole.generator)
    before = sample_from_cache(fc, "K", "clean", 4, 3, per_generator)[0]
    fc.compact(full=True)
    after = sample_from_cache(fc, "K", "clean", 4, 3, per_generator)[0]
    assert after.sha256 == before.sha256
    np.testing.assert_array_equal(after.X, before.X)


def hashlib_sha(tag: str) -> str:
    import hashlib

    return hashlib.sha256(tag.encode()).hexdigest()


def test_cache_compact_warning_is_one_clean_line(tmp_path, subprocess_env):
    """A damaged segment set aside by `cache compact`: one 'clipdet: warning: PATH ...' line, no source."""
    import subprocess
    import sys

    fc = FeatureCache(tmp_path / "c.h5")
    attrs = {"backbone": {"spec": "a"}, "layers": [], "dim": 8}
    p = fc.write_shard({("K", "clean"): (FeatureRows([_sha(1)], _unit(1, 8)), attrs)})
    fc.write_shard({("K", "clean"): (FeatureRows([_sha(2)], _unit(1, 8, 2)), attrs)})
    with open(p, "r+b") as fh:
        fh.write(b"garbage!")
    r = subprocess.run([sys.executable, "-m", "clipdet", "cache", "compact", "--full", "-c", fc.path],
                       env=subprocess_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(ln.startswith("clipdet: warning: ") for ln in lines), r.stderr
    assert any(os.path.basename(p) in ln and "set aside" in ln for ln in lines)
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr


def test_writing_to_a_v1_cache_upgrades_it_in_place(tmp_path):
    """The first write to a v1 cache links the v1 file in as a segment (no copy) and keeps every row."""
    path = str(tmp_path / "old.h5")
    x = _write_v1(path, "K")
    ino = os.stat(path).st_ino
    fc = FeatureCache(path)
    fc.write_shard({("K", "clean"): (FeatureRows([_sha(9)], _unit(1, 8, 9)), json.loads(json.dumps({
        "backbone": {"spec": "a:b", "arch": "a", "weights_id": "w", "preprocess": {}}, "layers": [], "dim": 8})))},
        images=[ImageMeta(_sha(9), "real")])
    info = FeatureCache(path).info()
    assert info["format_version"] == 2 and info["segments"] == 2 and info["images"] == 5
    segs = FeatureCache(path).segments()
    assert os.stat(segs[0]).st_ino == ino  # the v1 file itself, hard-linked, not copied
    got = FeatureCache(path).load("K", "clean", shas=[_sha(i) for i in range(4)])
    np.testing.assert_array_equal(got.embedding, x.astype(np.float16).astype(np.float32))
