"""clipdet fit: shot sampling, detectors end to end, determinism, files, attribution, calibration."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import clipdet
from clipdet.cache import FeatureCache, FeatureRows, ImageMeta
from clipdet.detectors import head_kind, list_heads
from clipdet.detectors.detector import Detector
from clipdet.errors import DetectorFileError, UsageError
from clipdet.extract.lazy import LazyBackbone
from clipdet.fit.config import FitConfig, parse_params, parse_shots
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool
from clipdet.fit.shots import sample_shots

DIM = 48


def _synthetic_cache(path, n_real=40, gens=("genA", "genB", "genC"), n_per_gen=20, seed=0, shift=0.6):
    """A cache with separable synthetic embeddings: reals around one centre, each generator around its own."""
    rng = np.random.default_rng(seed)
    centres = {g: rng.normal(size=DIM) for g in ("real", *gens)}
    rows, metas, i = [], [], 0
    for label, gen, n in [("real", "", n_real)] + [("fake", g, n_per_gen) for g in gens]:
        for _ in range(n):
            v = shift * centres[gen or "real"] + rng.normal(size=DIM) * 0.5
            rows.append(v / np.linalg.norm(v))
            sha = f"{i:064x}"
            metas.append(ImageMeta(sha, label, gen, 32, 32, "PNG", [f"/data/{label}/{gen}/{i}.png"]))
            i += 1
    X = np.array(rows, dtype=np.float16)
    shas = [m.sha256 for m in metas]
    backbone = {"spec": "synthetic:random", "arch": "synthetic", "weights": "random", "weights_id": "random-seed-0",
                "preprocess": {}, "extra": {}}
    cache = FeatureCache(path)
    cache.write_shard({("synthetic__random-seed-0", "clean"): (FeatureRows(shas, X),
                                                              {"backbone": backbone, "layers": [], "dim": DIM})},
                      images=metas)
    cache.compact()
    return cache


@pytest.fixture
def syn_cache(tmp_path):
    return _synthetic_cache(tmp_path / "syn.h5")


def test_parse_shots_and_params():
    assert parse_shots("10") == 10 and parse_shots("all") is None and parse_shots(None) is None
    assert parse_shots("0") == 0  # zero-shot heads only (fit refuses it for the others: test_text.py)
    for bad in ("-3", "ten"):
        with pytest.raises(UsageError):
            parse_shots(bad)
    assert parse_params(["C=0.5", "class_weight=null", "device=cpu"]) == {"C": 0.5, "class_weight": None,
                                                                          "device": "cpu"}
    with pytest.raises(UsageError):
        parse_params(["C"])


def test_sample_shots_per_class_per_generator_and_order_free():
    labels = ["real"] * 10 + ["fake"] * 12
    gens = [""] * 10 + ["a"] * 6 + ["b"] * 6
    keys = [f"{i:03d}" for i in range(22)]
    idx = sample_shots(labels, gens, 3, seed=1, keys=keys)
    assert sum(labels[i] == "real" for i in idx) == 3 and sum(labels[i] == "fake" for i in idx) == 3
    assert idx == sample_shots(labels, gens, 3, seed=1, keys=keys)
    assert idx != sample_shots(labels, gens, 3, seed=2, keys=keys)
    # the draw depends on content keys, not on the order the files were listed in
    perm = np.random.default_rng(0).permutation(22)
    shuffled = sample_shots([labels[i] for i in perm], [gens[i] for i in perm], 3, 1, keys=[keys[i] for i in perm])
    assert sorted(keys[perm[j]] for j in shuffled) == sorted(keys[i] for i in idx)
    pg = sample_shots(labels, gens, 2, seed=0, per_generator=True, keys=keys)
    assert sorted(gens[i] for i in pg if labels[i] == "fake") == ["a", "a", "b", "b"]
    assert sum(labels[i] == "real" for i in pg) == 4  # K x number of generators
    assert len(sample_shots(labels, gens, None, 0, keys=keys)) == 22


# heads reading attention heads or block tokens are tested in test_heads_fit.py; zeroshot (prompts) in test_text.py
@pytest.mark.parametrize("head", sorted(h for h in list_heads() if head_kind(h) == "embedding" and h != "zeroshot"))
def test_every_head_separates_synthetic_task_from_cache(syn_cache, head, tmp_path):
    det = clipdet.fit(head=head, shots=10, seed=0, cache=syn_cache)
    assert det.meta["head"] == head and det.meta["counts"] == {"real": 10, "fake": 10, "extra_rows": 0}
    pool_all = FeatureCache(syn_cache.path).load("synthetic__random-seed-0", "clean")
    imgs = syn_cache.images()
    y = np.array([imgs[s].label == "fake" for s in pool_all.sha256])
    test = np.array([s not in det.reference_shas for s in pool_all.sha256])
    scores = det.decision_function(pool_all.embedding[test])
    from clipdet.evaluate.metrics import roc_auc

    assert roc_auc(y[test].astype(int), scores) > 0.95
    # the calibrated threshold keeps false positives on held-out reals near the target
    fpr = float(np.mean(scores[~y[test]] >= det.threshold))
    assert fpr <= 0.25
    p = det.predict_proba(pool_all.embedding[test])
    assert np.all((p >= 0) & (p <= 1)) and p[y[test]].mean() > p[~y[test]].mean()


@pytest.mark.parametrize("head", ["svm", "mlp", "knn"])
def test_same_seed_same_detector_bytes_and_round_trip(syn_cache, tmp_path, head):
    a = clipdet.fit(head=head, shots=8, seed=3, cache=syn_cache).save(tmp_path / "a.clipdet")
    b = clipdet.fit(head=head, shots=8, seed=3, cache=syn_cache).save(tmp_path / "b.clipdet")
    assert Path(a).read_bytes() == Path(b).read_bytes()
    c = clipdet.fit(head=head, shots=8, seed=4, cache=syn_cache).save(tmp_path / "c.clipdet")
    assert Path(a).read_bytes() != Path(c).read_bytes()
    det = clipdet.fit(head=head, shots=8, seed=3, cache=syn_cache)
    loaded = Detector.load(a)
    X = syn_cache.load("synthetic__random-seed-0", "clean").embedding
    np.testing.assert_array_equal(det.decision_function(X), loaded.decision_function(X))
    np.testing.assert_array_equal(det.predict_proba(X), loaded.predict_proba(X))
    assert json.dumps(det.score_features(X[:5])) == json.dumps(loaded.score_features(X[:5]))  # NaN-safe equality
    assert loaded.meta["reference_sha256"] == det.meta["reference_sha256"] and len(det.meta["reference_sha256"]) == 16


def test_fit_config_is_the_same_fit_as_keywords(syn_cache, tmp_path):
    """One FitConfig replaces fit's keyword soup: the same settings give the same detector bytes, keywords
    override the config's fields, and an unknown option is one UsageError naming the valid ones."""
    cfg = FitConfig(head="logreg", shots=6, seed=2, per_generator=True, target_fpr=0.1)
    a = clipdet.fit(config=cfg, cache=syn_cache).save(tmp_path / "a.clipdet")
    b = clipdet.fit(head="logreg", shots=6, seed=2, per_generator=True, target_fpr=0.1,
                    cache=syn_cache).save(tmp_path / "b.clipdet")
    assert Path(a).read_bytes() == Path(b).read_bytes()
    c = clipdet.fit(config=cfg.replace(seed=5), cache=syn_cache)
    assert c.meta["seed"] == 5 and c.meta["per_generator"] is True and cfg.seed == 2
    d = clipdet.fit(config=cfg, cache=syn_cache, seed=5).save(tmp_path / "d.clipdet")
    assert Path(d).read_bytes() == Path(c.save(tmp_path / "c.clipdet")).read_bytes()
    with pytest.raises(UsageError, match="unknown fit option.*shot.*valid: .*shots"):
        clipdet.fit(cache=syn_cache, shot=3)
    with pytest.raises(UsageError, match="unknown fit option"):
        cfg.replace(heads="svm")


def test_detector_file_holds_the_audit_trail_and_no_pickle(syn_cache, tmp_path):
    path = clipdet.fit(head="logreg", shots=5, seed=0, cache=syn_cache, target_fpr=0.1).save(tmp_path / "d.clipdet")
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["clipdet"])["meta"]
    d = meta["detector"]
    for key in ("backbone", "view", "head", "params", "seed", "shots", "target_fpr", "calibration", "counts",
                "reference_sha256", "clipdet_version", "generators"):
        assert key in d, key
    assert d["backbone"]["weights_id"] == "random-seed-0" and d["target_fpr"] == 0.1
    assert b"pickle" not in raw and b"\x80\x04" not in raw[8 + n:8 + n + 2]


def test_tampered_truncated_and_newer_detector_files_refused(syn_cache, tmp_path):
    path = clipdet.fit(head="svm", shots=5, seed=0, cache=syn_cache).save(tmp_path / "d.clipdet")
    raw = bytearray(Path(path).read_bytes())
    (tmp_path / "trunc.clipdet").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.clipdet").write_bytes(flipped)
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].decode()
    # change a threshold's value and keep the JSON valid: a leading 1 (-0.35 -> -10.35, 0.4 -> 10.4)
    edited = re.sub(r'(\\"threshold\\":\s*-?)', r"\g<1>1", header, count=1)
    assert edited != header
    (tmp_path / "edit.clipdet").write_bytes(struct.pack("<Q", len(edited.encode())) + edited.encode() + raw[8 + n:])
    for name, pattern in [("trunc", "trunc.clipdet.*(truncat|incomplete|size)"), ("flip", "checksum|SHA"),
                          ("edit", "checksum|SHA")]:
        with pytest.raises(DetectorFileError, match=pattern) as e:
            Detector.load(tmp_path / f"{name}.clipdet")
        assert "\n" not in str(e.value)
    # a file from a newer format version (written consistently, checksum and all) is refused by version
    from clipdet.persist import load_bundle, save_bundle

    meta, arrays = load_bundle(path)
    save_bundle(tmp_path / "new.clipdet", meta, arrays, kind="clipdet-detector", version=2)
    with pytest.raises(DetectorFileError, match="newer"):
        Detector.load(tmp_path / "new.clipdet")


def test_attribution_names_generators_and_says_unknown_for_an_unseen_one(tmp_path):
    cache = _synthetic_cache(tmp_path / "c.h5", gens=("genA", "genB", "genC", "genZ"), n_per_gen=20, shift=2.0)
    det = clipdet.fit(head="logreg", shots=8, seed=0, cache=cache, per_generator=True, exclude_generators=["genZ"])
    assert det.attribution is not None and det.meta["generators"] == ["genA", "genB", "genC"]
    rows = cache.load("synthetic__random-seed-0", "clean")
    imgs = cache.images()
    held = [i for i, s in enumerate(rows.sha256) if s not in det.reference_shas]
    gens = np.array([imgs[rows.sha256[i]].generator for i in held], dtype=object)
    names, _ = det.attribute(rows.embedding[held])
    known = np.isin(gens, ["genA", "genB", "genC"])
    assert np.mean(names[known] == gens[known]) >= 0.9
    assert np.mean(names[gens == "genZ"] == "unknown") >= 0.8
    # a detector without generator names does no attribution
    plain = clipdet.fit(head="logreg", shots=8, seed=0, cache=cache, attribute=False)
    assert plain.attribution is None and plain.attribute(rows.embedding[:3])[0].tolist() == ["", "", ""]


def test_fit_options_exclude_augment_view_and_errors(syn_cache, tmp_path):
    with pytest.raises(UsageError, match="no such generator"):
        clipdet.fit(cache=syn_cache, exclude_generators=["nope"])
    det = clipdet.fit(cache=syn_cache, shots="all", exclude_generators=["genA"])
    assert det.meta["counts"]["fake"] == 40 and "genA" not in det.meta["generators"]
    with pytest.raises(UsageError, match="no 'jpeg:75' features"):
        clipdet.fit(cache=syn_cache, view="jpeg:75")
    with pytest.raises(UsageError, match="no feature cache"):
        clipdet.fit(cache=tmp_path / "missing.h5")
    with pytest.raises(UsageError, match="unknown head"):
        clipdet.fit(cache=syn_cache, head="forest")
    with pytest.raises(UsageError, match="unknown parameter"):
        clipdet.fit(cache=syn_cache, head="svm", params={"gamma": 1})


def test_calibration_from_references_only_and_from_held_out_set(syn_cache):
    pool = syn_cache.load("synthetic__random-seed-0", "clean")
    imgs = syn_cache.images()
    labels = [imgs[s].label for s in pool.sha256]
    full = Pool(pool.sha256, labels, [imgs[s].generator for s in pool.sha256], ["p"] * len(labels), pool.embedding)
    idx = sample_shots(full.label, full.generator, 6, 0, keys=full.sha256)
    refs = full.take(idx)
    rest = full.take([i for i in range(len(full)) if i not in set(idx)])
    cv = fit_from_pool(refs, head="svm", seed=0, attribute=False)
    assert cv.meta["calibration"]["method"] in ("cross-validation", "leave-one-out")
    assert cv.meta["calibration"]["n"] == 12 and cv.meta["calibration_sha256"] == []
    held = fit_from_pool(refs, head="svm", seed=0, attribute=False, calibration=rest, target_fpr=0.05)
    assert held.meta["calibration"]["method"] == "held-out" and held.meta["calibration"]["n"] == len(rest)
    real_scores = held.decision_function(rest.X[rest.y == 0])
    assert np.mean(real_scores >= held.threshold) <= 0.05  # exactly the target on the calibration set
    assert set(held.reference_shas) >= set(rest.sha256)  # calibration images count as references for eval
    # identical head, only the calibration differs
    np.testing.assert_array_equal(cv.decision_function(rest.X), held.decision_function(rest.X))


def test_end_to_end_fit_from_tiny_model_features(labelled_tree, tiny_spec, tiny_backbone, tmp_path, run_cli):
    cache = tmp_path / "c.h5"
    s = clipdet.extract(clipdet.discover([str(labelled_tree)]), tiny_spec, cache=cache,
                        lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone))
    assert s.new == 24
    out = tmp_path / "det.clipdet"
    r = run_cli("fit", "--cache", str(cache), "--head", "svm", "--shots", "5", "--seed", "1", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "5 real + 5 fake references" in r.stdout and "attributes 2 generators" in r.stdout
    det = Detector.load(out)
    assert det.describe_unsure() in r.stdout and "unsure band: " in r.stdout  # fit shows the band it stored
    assert det.backbone["spec"] == tiny_spec and det.meta["shots"] == 5
    rows = det.score_paths([str(labelled_tree)], cache=str(cache))
    assert len(rows) == 24 and all(r["error"] == "" for r in rows)
    again = clipdet.score_paths(det, [str(labelled_tree)], cache=str(cache))  # the scoring stage's own form
    assert json.dumps(again) == json.dumps(rows)  # NaN-safe equality
    y = np.array([1 if "/fake/" in r["path"] else 0 for r in rows])
    from clipdet.evaluate.metrics import roc_auc

    assert roc_auc(y, np.array([r["score"] for r in rows])) > 0.9  # the fixture's fakes are separable
    # fitting from PATHs (not the whole cache) and per-generator shots through the CLI
    r = run_cli("fit", str(labelled_tree / "real"), str(labelled_tree / "fake" / "genA"), "--cache", str(cache),
                "--head", "knn", "--shots", "3", "--per-generator", "--out", str(tmp_path / "k.clipdet"))
    assert r.exit_code == 0, r.stderr
    assert Detector.load(tmp_path / "k.clipdet").meta["candidates"] == {"real": 8, "fake": 8}
    r = run_cli("heads")
    assert r.exit_code == 0 and all(h in r.stdout for h in list_heads())
    r = run_cli("fit", "--cache", str(cache), "--head", "svm", "--shots", "0")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_fit_from_cache_and_fit_path_give_the_same_detector_bytes(labelled_tree, tiny_spec, tiny_backbone,
                                                                  tmp_path, head):
    """Issue 21: the same images, seed and shots give one detector, drawn from the cache or from a PATH
    (rows reach the head in content-hash order, not in the cache's or the folder walk's order)."""
    from clipdet.extract.discover import discover

    cache = str(tmp_path / "c.h5")
    clipdet.extract(discover([str(labelled_tree)]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone))
    a = clipdet.fit(head=head, shots=5, seed=0, cache=cache)
    b = clipdet.fit(paths=[str(labelled_tree)], backbone=tiny_spec, head=head, shots=5, seed=0, cache=cache)
    assert sorted(a.meta["reference_sha256"]) == sorted(b.meta["reference_sha256"])
    assert a.threshold == b.threshold
    assert Path(a.save(tmp_path / "a.clipdet")).read_bytes() == Path(b.save(tmp_path / "b.clipdet")).read_bytes()


def test_fit_says_drawn_rows_are_damaged_and_how_to_repair(syn_cache, tmp_path, run_cli):
    """Issue 21: not 'found real 0, fake 0' when the cache holds the images but every drawn row fails its checks."""
    import h5py

    syn_cache.compact(full=True)
    with h5py.File(syn_cache.segments()[0], "r+") as f:  # bit rot that keeps the checksums: NaNs in place
        ds = f["features/synthetic__random-seed-0/clean/embedding"]
        rows = ds[()]
        rows[:, 3] = np.nan
        ds[...] = rows
    r = run_cli("fit", "-c", syn_cache.path, "--shots", "10", "-o", tmp_path / "d.clipdet", "-q")
    assert r.exit_code == 2, r.output
    assert "damaged" in r.stderr and "clipdet cache verify --repair" in r.stderr, r.stderr
    assert "found real 0" not in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "d.clipdet").exists()
