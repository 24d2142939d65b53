"""The text tower: cached text embeddings, the zeroshot head, caption features (image+text, residual)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

import clipdet
from clipdet.cache import FeatureCache
from clipdet.detectors.detector import Detector
from clipdet.extract.discover import discover
from clipdet.extract.lazy import LazyBackbone
from clipdet.text import MISSING_CAPTION, TEXT_VIEW, TextEmbedder, text_sha


@pytest.fixture(scope="module")
def tower(tiny_spec):
    """The tiny model's text tower, built once for the module."""
    from clipdet.backbones import create_text_tower

    return create_text_tower(tiny_spec, device="cpu")


@pytest.fixture
def tree_cache(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    """(tree, cache path, backbone key): the labelled tree extracted with the tiny backbone."""
    cache = str(tmp_path / "c.h5")
    clipdet.extract(discover([str(labelled_tree)]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone))
    return labelled_tree, cache, tiny_backbone.info.key


def caption_of(path) -> str:
    """A deterministic caption made from the file name (what the benchmark does for aigi-dev)."""
    return f"a picture named {Path(path).stem.replace('_', ' ')}"


def write_manifest(tree, path):
    """A manifest with a caption column for every image under `tree`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator", "caption"])
        for r in discover([str(tree)]):
            w.writerow([r.path, r.label, r.generator or "", caption_of(r.path)])
    return str(path)


def by_hand_text(tiny_weights, texts) -> np.ndarray:
    """open_clip's own tokenizer and text tower, normalised, rounded to float16 as the cache stores them."""
    import torch

    from clipdet.backbones.openclip import _open_clip

    oc = _open_clip()
    model = oc.create_model("clipdet-tiny", pretrained=tiny_weights).eval()
    with torch.no_grad():
        t = model.encode_text(oc.get_tokenizer("clipdet-tiny")(list(texts)), normalize=True).numpy()
    return t.astype(np.float16).astype(np.float32)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------- text cache
def test_text_embeddings_cached_once_per_distinct_text(tiny_spec, tower, tmp_path, monkeypatch):
    cache = str(tmp_path / "t.h5")
    emb = TextEmbedder(tiny_spec, cache=cache, tower=tower)
    calls0 = tower.calls
    a = emb.embed(["a photo", "an AI image", "a photo"])
    assert emb.encoded == 2 and tower.calls == calls0 + 1  # one model call, two distinct texts
    np.testing.assert_array_equal(a[0], a[2])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=2e-3)
    fc = FeatureCache(cache)
    assert sorted(fc.cached_shas(tower.info.key, TEXT_VIEW)) == sorted({text_sha("a photo"), text_sha("an AI image")})
    # a second run (new process state) encodes nothing and never builds the tower
    import clipdet.backbones as B

    monkeypatch.setattr(B, "create_text_tower", lambda *a, **k: pytest.fail("text tower built for cached texts"))
    again = TextEmbedder(tiny_spec, cache=cache)
    b = again.embed(["a photo", "an AI image"])
    assert again.encoded == 0 and again._tower is None
    np.testing.assert_array_equal(b, a[:2])


def test_text_group_is_never_an_image_view(tree_cache, tiny_spec, tower, run_cli):
    tree, cache, key = tree_cache
    TextEmbedder(tiny_spec, cache=cache, tower=tower).embed(["some caption"])
    groups = {(g.key, g.view) for g in FeatureCache(cache).groups(count=False)}
    assert (key, TEXT_VIEW) in groups
    # fit from the cache: trains on clean only; --augment-views does not add the text rows
    det = clipdet.fit(head="centroid", shots=4, cache=cache, augment_views=True)
    assert det.meta["counts"]["extra_rows"] == 0 and det.head.n_features_in_ == 32
    r = run_cli("cache", "info", "-c", cache)
    assert r.exit_code == 0 and "text embeddings: 1 texts" in r.stdout
    r = run_cli("cache", "verify", "-c", cache)  # text rows pass the same checks as image rows
    assert r.exit_code == 0, r.stdout + r.stderr
    r = run_cli("cache", "export", str(cache) + ".parquet", "--view", "text", "-c", cache)
    assert r.exit_code == 2 and "unknown view 'text'" in r.stderr
    r = run_cli("fit", "--view", "text", "-c", cache, "-o", str(cache) + ".det")
    assert r.exit_code == 2 and "unknown view 'text'" in r.stderr


def test_text_tower_cuts_padding_exactly(tower, tiny_weights):
    """The tower runs up to the longest text of each batch; the result equals open_clip's full-context
    encode_text (causal mask, end-of-text pooling), and input order is kept across length-sorted batches."""
    import torch

    texts = ["a", "a much longer caption that fills most of the tiny context window", "an AI image", "x y"]
    got = tower.encode(texts, batch_size=2)
    with torch.no_grad():
        want = tower.model.encode_text(tower.tokenize(texts), normalize=True).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------------------------------- zero-shot
def test_zeroshot_scores_equal_by_hand_cosine(tree_cache, tiny_weights, tmp_path, run_cli):
    from clipdet.detectors.zeroshot import DEFAULT_PROMPTS
    from clipdet.score.stream import score_refs

    tree, cache, key = tree_cache
    out = tmp_path / "zs.clipdet"
    r = run_cli("fit", "--head", "zeroshot", "--shots", "0", "-c", cache, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "UNCALIBRATED" in r.stdout and "calibration: none" in r.stderr
    assert "target FPR" not in r.stdout.replace("not set at any target FPR", "")  # issue 21: no FPR is claimed
    det = Detector.load(out)
    assert det.meta["uncalibrated"] is True and det.threshold == 0.0 and det.meta["prompts"] == DEFAULT_PROMPTS
    assert det.meta["counts"] == {"real": 0, "fake": 0, "extra_rows": 0}
    rows = list(score_refs(discover([str(tree)]), det, cache=cache))
    feats = FeatureCache(cache).load(key, "clean", shas=[r["sha256"] for r in rows])
    real = unit(unit(by_hand_text(tiny_weights, DEFAULT_PROMPTS["real"])).mean(0))
    fake = unit(unit(by_hand_text(tiny_weights, DEFAULT_PROMPTS["fake"])).mean(0))
    img = unit(feats.embedding.astype(np.float64))
    expect = img @ fake - img @ real
    np.testing.assert_allclose([r["score"] for r in rows], expect, atol=1e-6)
    assert [r["label"] for r in rows] == ["fake" if e >= 0 else "real" for e in expect]
    np.testing.assert_allclose([r["p_fake"] for r in rows], 1 / (1 + np.exp(-100.0 * expect)), rtol=1e-5)
    # other heads need references
    r = run_cli("fit", "--head", "svm", "--shots", "0", "-c", cache, "-o", tmp_path / "x.clipdet")
    assert r.exit_code == 2 and "heads that work without any: zeroshot" in r.stderr


def test_zeroshot_prompts_file_and_calibration_on_references(tree_cache, tmp_path):
    tree, cache, key = tree_cache
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"real": ["a camera photo"], "fake": ["a rendered image", "an AI picture"]}))
    det = clipdet.fit(head="zeroshot", shots=4, seed=0, cache=cache, params={"prompts": str(prompts)})
    assert det.meta["prompts"]["fake"] == ["a rendered image", "an AI picture"]
    assert det.head.get_params()["prompts"] == det.meta["prompts"]  # the text, not the file name
    assert det.meta["calibration"]["method"] == "references" and not det.meta.get("uncalibrated")
    # the threshold sits at the target FPR of the references' own scores (nothing was trained on them)
    from clipdet.detectors.calibration import reference_threshold

    refs = FeatureCache(cache).load(key, "clean", shas=det.meta["reference_sha256"])
    labels = FeatureCache(cache).image_metas(refs.sha256)
    s = det.decision_function(refs.embedding)
    y = np.array([labels[x].label == "fake" for x in refs.sha256])
    assert det.threshold == pytest.approx(reference_threshold(s[~y], det.meta["target_fpr"])[0])
    path = det.save(tmp_path / "zs.clipdet")
    np.testing.assert_array_equal(Detector.load(path).decision_function(refs.embedding), s)
    with pytest.raises(clipdet.errors.UsageError, match="not a JSON prompts file|expected"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"real": []}')
        clipdet.fit(head="zeroshot", shots=0, cache=cache, params={"prompts": str(bad)})


# ---------------------------------------------------------------------------------------- caption features
@pytest.mark.parametrize("features", ["image+text", "residual"])
def test_caption_features_equal_by_hand_and_round_trip(tree_cache, tiny_spec, tmp_path, run_cli, features):
    tree, cache, key = tree_cache
    manifest = write_manifest(tree, tmp_path / "m.csv")
    out = tmp_path / "d.clipdet"
    r = run_cli("fit", "--manifest", manifest, "--head", "centroid", "--shots", "4", "--features", features,
                "-c", cache, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert f"features {features}" in r.stdout
    det = Detector.load(out)
    assert det.features == features
    r = run_cli("score", "--manifest", manifest, "-d", out, "-c", cache, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0, r.stderr
    rows = read_rows(tmp_path / "s.csv")
    fc = FeatureCache(cache)
    img = fc.load(key, "clean", shas=[r["sha256"] for r in rows]).embedding
    txt = fc.load(key, TEXT_VIEW, shas=[text_sha(caption_of(r["path"])) for r in rows]).embedding
    assert len(img) == len(txt) == len(rows) == 24
    if features == "image+text":
        X = np.hstack([unit(img), unit(txt)])
    else:
        i, t = unit(img), unit(txt)
        X = unit(i - np.sum(i * t, axis=1, keepdims=True) * t)
    np.testing.assert_allclose([float(r["score"]) for r in rows], det.decision_function(X), rtol=1e-5, atol=1e-5)
    # the fit saw the same features: the centroid prototypes are the class means of the references' rows
    pos = {r["sha256"]: i for i, r in enumerate(rows)}
    fake = {r["sha256"] for r in rows if "/fake/" in r["path"]}
    refs = det.meta["reference_sha256"]
    protos = [unit(unit(X[[pos[s] for s in refs if (s in fake) == c]]).mean(0)) for c in (False, True)]
    np.testing.assert_allclose(det.head.prototypes_, np.stack(protos), atol=1e-5)


def test_missing_caption_is_a_row_error_and_missing_captions_refused(tree_cache, tmp_path, run_cli):
    tree, cache, key = tree_cache
    manifest = write_manifest(tree, tmp_path / "m.csv")
    out = tmp_path / "d.clipdet"
    r = run_cli("fit", "--manifest", manifest, "--head", "centroid", "--shots", "4", "--features", "residual",
                "-c", cache, "-o", out)
    assert r.exit_code == 0, r.stderr
    # a captions CSV by sha256 for all but one image
    refs = discover([str(tree)])
    from clipdet.extract.decode import read_file, sha256_bytes

    caps = tmp_path / "caps.csv"
    with open(caps, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sha256", "caption"])
        for ref in refs[1:]:
            w.writerow([sha256_bytes(read_file(ref.path)), caption_of(ref.path)])
    r = run_cli("score", str(tree), "-d", out, "-c", cache, "--captions", caps, "--out", tmp_path / "s.csv")
    assert r.exit_code == 1  # done, one row could not be scored
    assert "; 0 could not be read; 1 without a caption" in r.stdout  # read fine: only its caption is missing
    rows = read_rows(tmp_path / "s.csv")
    assert len(rows) == 24
    bad = [x for x in rows if x["error"]]
    assert [x["path"] for x in bad] == [refs[0].path] and bad[0]["error"] == MISSING_CAPTION
    assert all(x["score"] for x in rows if not x["error"])
    # no captions at all: one line, no traceback
    r = run_cli("score", str(tree), "-d", out, "-c", cache, "--out", tmp_path / "s2.csv")
    assert r.exit_code == 2 and "needs a caption per image" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("fit", str(tree), "--head", "svm", "--shots", "4", "--features", "image+text", "-c", cache,
                "-o", tmp_path / "x.clipdet")
    assert r.exit_code == 2 and "--captions FILE.csv" in r.stderr
    # the manifest caption column and eval take captions the same way
    r = run_cli("eval", "--manifest", manifest, "-d", out, "-c", cache, "--exclude-references", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["detector"]["features"] == "residual"


# ---------------------------------------------------------------------------------------- bench
def test_bench_kshot_has_k0_for_zeroshot_and_runs_caption_features(tree_cache, tmp_path, run_cli):
    tree, cache, key = tree_cache
    out = tmp_path / "bench"
    r = run_cli("bench", "--protocol", "kshot", "--heads", "zeroshot,centroid", "--ks", "2", "--seeds", "2",
                "-c", cache, "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    rows = read_rows(out / "kshot.csv")
    assert [(x["head"], x["k"]) for x in rows] == [("zeroshot", "0"), ("zeroshot", "2"), ("zeroshot", "2"),
                                                   ("centroid", "2"), ("centroid", "2")]
    k0 = rows[0]
    assert k0["n_train"] == "0" and k0["n_test"] == "24" and k0["calibration"] == "none (zero-shot)"
    assert "zeroshot AUC K=0:" in r.stdout
    manifest = write_manifest(tree, tmp_path / "m.csv")
    r = run_cli("bench", "--manifest", manifest, "--protocol", "kshot", "--heads", "centroid", "--ks", "2",
                "--seeds", "1", "--features", "image+text", "-c", cache, "--out", tmp_path / "b2", "-q")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "b2" / "run.json").read_text())["config"]["features"] == "image+text"
    r = run_cli("bench", "--protocol", "kshot", "--heads", "zeroshot", "--ks", "2", "--seeds", "1",
                "--features", "residual", "-c", cache, "--out", tmp_path / "b3", "-q")
    assert r.exit_code == 2 and "--features image" in r.stderr


# ---------------------------------------------------------------------------------------- serve
def test_serve_takes_captions_per_upload(tree_cache, tmp_path, run_cli):
    pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
    from fastapi.testclient import TestClient

    from clipdet.serve import Engine, ServeOptions, create_app

    tree, cache, key = tree_cache
    manifest = write_manifest(tree, tmp_path / "m.csv")
    out = tmp_path / "d.clipdet"
    assert run_cli("fit", "--manifest", manifest, "--head", "logreg", "--shots", "4", "--features", "image+text",
                   "-c", cache, "-o", out).exit_code == 0
    paths = [r.path for r in discover([str(tree)])][:3]
    assert run_cli("score", *paths, "--manifest", manifest, "-d", out, "-c", cache,
                   "--out", tmp_path / "s.csv").exit_code == 0
    offline = {x["path"]: x for x in read_rows(tmp_path / "s.csv")}
    engine = Engine(Detector.load(out), device="cpu")  # no cache: caption embeddings made in memory
    with TestClient(create_app(engine, ServeOptions()), base_url="http://127.0.0.1") as c:
        for _ in range(400):
            if c.get("/healthz").status_code == 200:
                break
            time.sleep(0.05)
        files = [("files", (f"{i}.png", Path(p).read_bytes(), "image/png")) for i, p in enumerate(paths)]
        r = c.post("/v1/score", files=files, data={"captions": [caption_of(p) for p in paths[:2]]})
        assert r.status_code == 200, r.text
        rows = r.json()["results"]
        assert c.get("/v1/detector").json()["features"] == "image+text"
    for row, p in zip(rows[:2], paths):
        assert row["error"] is None and f"{row['score']:.6g}" == offline[p]["score"]
    assert "no caption for this image" in rows[2]["error"] and rows[2]["label"] == "unknown"


def test_zeroshot_calibrated_on_held_out_images_only(tree_cache, tmp_path, run_cli):
    tree, cache, key = tree_cache
    out = tmp_path / "zs.clipdet"
    r = run_cli("fit", str(tree / "real"), "--head", "zeroshot", "--shots", "0", "--calibrate", str(tree),
                "-c", cache, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "UNCALIBRATED" not in r.stdout and "were not used" in r.stderr
    det = Detector.load(out)
    assert det.meta["calibration"]["method"] == "held-out" and det.meta["calibration"]["n"] == 24
    assert not det.meta.get("uncalibrated") and det.meta["reference_sha256"] == []
    assert len(det.meta["calibration_sha256"]) == 24  # eval refuses these images (overlap guard)
    r = run_cli("eval", str(tree), "-d", out, "-c", cache)
    assert r.exit_code == 2 and "references of the detector" in r.stderr


def test_unreadable_captions_csv_and_early_option_checks(tmp_path, run_cli, tree_cache):
    from clipdet.errors import UsageError
    from clipdet.text.captions import read_captions

    tree, cache, _ = tree_cache
    big = tmp_path / "big.csv"
    big.write_text('path,caption\na.png,"' + "x" * 200_000 + '"\n')
    with pytest.raises(UsageError, match=rf"{big}: line \d+: not a readable CSV row"):
        read_captions(big)
    # a --features typo in bench is refused before anything is extracted
    r = run_cli("bench", str(tree), "--features", "imgae", "-c", tmp_path / "fresh.h5", "-o", tmp_path / "b")
    assert r.exit_code == 2 and "--features 'imgae'" in r.stderr and not (tmp_path / "fresh.h5").exists()
    # --ray-address means nothing to the local engine: refused, not ignored
    r = run_cli("extract", str(tree), "-c", cache, "--ray-address", "10.0.0.5:6379")
    assert r.exit_code == 2 and "only used with --engine ray" in r.stderr
