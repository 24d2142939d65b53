"""extract.py: the reader → embedder → writer pipeline with the tiny model, in-process."""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np
import pytest
from conftest import single_segment

from clipdet import backbones as backbones_mod
from clipdet.cache import FeatureCache
from clipdet.errors import BackboneError, CacheMismatchError
from clipdet.extract import extract, iter_prepared, prepare
from clipdet.extract.decode import decode_image, sha256_bytes
from clipdet.extract.discover import ImageRef, discover
from clipdet.extract.lazy import LazyBackbone
from clipdet.extract.views import apply_view, parse_views

VIEWS = "jpeg:50,resize:0.5,blur:1.5,crop:32"


@pytest.fixture
def lazy(tiny_spec, tiny_backbone):
    """A fresh LazyBackbone around the already-loaded tiny model (no layers)."""
    return LazyBackbone(tiny_spec, "cpu", loaded=tiny_backbone)


def _sha(path) -> str:
    return sha256_bytes(open(path, "rb").read())


def _run(refs_or_dir, cache, lazy, **kw):
    refs = discover([str(refs_or_dir)]) if not isinstance(refs_or_dir, list) else refs_or_dir
    kw.setdefault("workers", 1)
    return extract(refs, lazy.spec, cache=cache, lazy=lazy, device="cpu", **kw)


def test_extract_tree_all_views(labelled_tree, tmp_path, lazy, tiny_backbone):
    cache = FeatureCache(tmp_path / "c.h5")
    s = _run(labelled_tree, cache, lazy, views=VIEWS, batch_size=5)
    assert (s.total, s.new, s.cached, s.errors) == (24, 24, 0, [])
    assert s.ok and s.embedded == 24 * 5
    assert s.views == parse_views(VIEWS) and s.backbone_key == tiny_backbone.info.key
    assert cache.shard_count() == 0 and os.path.isfile(cache.path)  # merges done by the end
    files = sorted(p for p in labelled_tree.rglob("*") if p.is_file())
    want = {_sha(p) for p in files}
    key = tiny_backbone.info.key
    with single_segment(cache.path) as f:
        for view in s.views:
            g = f[f"features/{key}/{view}"]
            assert {h.decode() for h in g["sha256"][()]} == want
            e = g["embedding"][()]
            assert e.dtype == np.float16 and e.shape == (24, 32)
            np.testing.assert_allclose(np.linalg.norm(e.astype(np.float32), axis=1), 1, atol=2e-3)
            assert int(g.attrs["dim"]) == 32
    # labels and generators from the layout
    imgs = cache.images()
    assert len(imgs) == 24
    for p in files:
        m = imgs[_sha(p)]
        assert m.paths == [str(p.resolve())]
        rel = p.relative_to(labelled_tree).parts
        assert m.label == rel[0]
        assert m.generator == (rel[1] if rel[0] == "fake" else "")
        assert m.format == ("JPEG" if p.suffix == ".jpg" else "PNG") and m.width >= 40 and m.height >= 40
    # stored embeddings are the model's embeddings of the decoded (and perturbed) pixels
    p = files[3]
    dec = decode_image(p.read_bytes(), str(p))
    for view in s.views:
        direct = tiny_backbone.embed(tiny_backbone.collate([tiny_backbone.preprocess(apply_view(dec.image, view))]))
        got = cache.load(key, view, shas=[_sha(p)]).embedding
        np.testing.assert_allclose(got, direct["embedding"], atol=3e-3)
    clean = cache.load(key, "clean").embedding
    for view in s.views[1:]:
        other = cache.load(key, view, shas=cache.load(key, "clean").sha256).embedding
        assert np.abs(other - clean).max() > 1e-2, f"{view} gave the same features as clean"


def test_rerun_is_idempotent_and_loads_no_model(labelled_tree, tmp_path, lazy, tiny_spec):
    cache = FeatureCache(tmp_path / "c.h5")
    _run(labelled_tree, cache, lazy, views="jpeg:75", batch_size=7)
    fresh = LazyBackbone(tiny_spec, "cpu")  # not loaded
    s = _run(labelled_tree, cache, fresh, views="jpeg:75")
    assert (s.new, s.cached, s.embedded) == (0, 24, 0)
    assert "24 cached, 0 new, 0 skipped" in s.line()
    assert not fresh.loaded  # everything cached: the model is never built
    with single_segment(cache.path) as f:
        for view in ("clean", "jpeg:75"):
            h = f[f"features/{fresh.key}/{view}/sha256"][()]
            assert len(h) == len(set(h.tolist())) == 24
        assert len(f["images/sha256"]) == 24


def test_moved_file_recognised_by_content(labelled_tree, tmp_path, lazy):
    cache = FeatureCache(tmp_path / "c.h5")
    _run(labelled_tree, cache, lazy)
    src = labelled_tree / "real" / "a" / "a_03.jpg"
    dst = labelled_tree / "real" / "renamed" / "deep" / "moved.jpg"
    dst.parent.mkdir(parents=True)
    shutil.move(src, dst)
    s = _run(labelled_tree, cache, lazy)
    assert (s.new, s.cached) == (0, 24)
    m = cache.images()[_sha(dst)]
    assert m.paths == [str(src.resolve()), str(dst.resolve())]
    assert m.label == "real"
    with single_segment(cache.path) as f:
        assert len(f[f"features/{lazy.key}/clean/sha256"]) == 24


def test_new_view_only_computes_that_view(labelled_tree, tmp_path, lazy, monkeypatch):
    cache = FeatureCache(tmp_path / "c.h5")
    _run(labelled_tree, cache, lazy)
    before = cache.load(lazy.key, "clean")
    seen_views = []
    real_apply = apply_view
    monkeypatch.setattr(sys.modules["clipdet.extract.pipeline"], "apply_view",
                        lambda im, v: seen_views.append(v) or real_apply(im, v))
    s = _run(labelled_tree, cache, lazy, views="blur:2")
    assert s.new == 24 and s.embedded == 24
    assert set(seen_views) == {"blur:2"}  # clean was cached: not recomputed
    after = cache.load(lazy.key, "clean")
    np.testing.assert_array_equal(after.embedding, before.embedding)
    assert len(cache.load(lazy.key, "blur:2").sha256) == 24


def test_duplicate_content_embedded_once(tmp_path, make_image, lazy):
    a = make_image(tmp_path / "d" / "fake" / "genX" / "one.png", seed=9, fake=True)
    b = tmp_path / "d" / "fake" / "genX" / "copy" / "two.png"
    b.parent.mkdir(parents=True)
    shutil.copy(a, b)
    make_image(tmp_path / "d" / "real" / "x.png", seed=10)
    cache = FeatureCache(tmp_path / "c.h5")
    s = _run(tmp_path / "d", cache, lazy, batch_size=1)
    assert (s.total, s.new, s.cached, s.embedded) == (3, 2, 1, 2)
    m = cache.images()[_sha(a)]
    assert sorted(m.paths) == sorted([str(a.resolve()), str(b.resolve())])
    assert (m.label, m.generator) == ("fake", "genX")
    assert len(cache.load(lazy.key, "clean").sha256) == 2


def test_workers_and_batching_do_not_change_features(labelled_tree, tmp_path, lazy):
    c0, c1 = FeatureCache(tmp_path / "a.h5"), FeatureCache(tmp_path / "b.h5")
    _run(labelled_tree, c0, lazy, workers=0, batch_size=24)
    _run(labelled_tree, c1, lazy, workers=3, batch_size=2)
    a = c0.load(lazy.key, "clean")
    b = c1.load(lazy.key, "clean", shas=a.sha256)
    assert b.sha256 == a.sha256
    np.testing.assert_allclose(a.embedding, b.embedding, atol=2e-3)


def test_iter_prepared_keeps_input_order():
    import random
    import time

    refs = [ImageRef(str(i)) for i in range(40)]

    def slow(r):
        time.sleep(random.random() / 500)
        return r.path

    assert list(iter_prepared(refs, 4, slow, prefetch=8)) == [str(i) for i in range(40)]
    assert list(iter_prepared(refs, 0, slow, prefetch=8)) == [str(i) for i in range(40)]


def test_prepare_skips_decoding_cached_content(tmp_path, make_image):
    p = make_image(tmp_path / "x.png")
    h = _sha(p)

    def boom(_):
        raise AssertionError("must not preprocess cached content")

    out = prepare(ImageRef(str(p), "real"), ["clean"], {"clean": {h}}, boom)
    assert (out.sha256, out.error, out.tensors) == (h, "", {})
    assert out.meta.label == "real" and out.meta.paths == [str(p.resolve())]


def test_bad_files_recorded_and_skipped(tmp_path, make_image, lazy):
    d = tmp_path / "in"
    good = [make_image(d / "real" / f"g{i}.png", seed=i) for i in range(3)]
    (d / "real" / "empty.jpg").write_bytes(b"")
    (d / "real" / "text.jpg").write_text("plain text\n")
    jpg = make_image(tmp_path / "src.jpg", size=(120, 90)).read_bytes()
    (d / "fake" / "g").mkdir(parents=True)
    (d / "fake" / "g" / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "fake" / "g" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    cache = FeatureCache(tmp_path / "c.h5")
    s = _run(d, cache, lazy, batch_size=2)
    assert not s.ok and s.new == 3
    reasons = {os.path.basename(p): r for p, r in s.errors}
    assert set(reasons) == {"empty.jpg", "text.jpg", "trunc.jpg", "dangling.png"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["trunc.jpg"] and "unreadable" in reasons["dangling.png"]
    errs = {os.path.basename(e["path"]): e for e in cache.errors()}
    assert {k: v["reason"] for k, v in errs.items()} == reasons
    assert errs["trunc.jpg"]["sha256"] == _sha(d / "fake" / "g" / "trunc.jpg")
    assert cache.cached_shas(lazy.key, "clean") == {_sha(p) for p in good}
    _run(d, cache, lazy)  # a second run reports them again but records each once
    assert len(cache.errors()) == 4


def test_layers_stored_and_mismatch_refused(labelled_tree, tmp_path, tiny_spec, tiny_backbone, make_image):
    cache = FeatureCache(tmp_path / "c.h5")
    lz = LazyBackbone(tiny_spec, "cpu", layers=(-1, -2), loaded=tiny_backbone)
    s = _run(labelled_tree, cache, lz, batch_size=8)
    assert s.new == 24
    r = cache.load(lz.key, "clean", with_layers=True)
    assert r.layers.shape == r.layers_mean.shape == (24, 2, 64)  # CLS tokens and patch-token means
    np.testing.assert_allclose(np.linalg.norm(r.layers, axis=2), 1, atol=3e-3)
    np.testing.assert_allclose(np.linalg.norm(r.layers_mean, axis=2), 1, atol=3e-3)
    with single_segment(cache.path) as f:
        g = f[f"features/{lz.key}/clean"]
        assert g["layers"].dtype == np.float16 and g["layers"].shape == (24, 2, 64)
        assert g.attrs["layers"] == "[1, 0]"
    make_image(labelled_tree / "real" / "a" / "new.png", seed=77)
    shards_before = cache.segments()
    for other in ((), (-1,), (0, 1)):  # none, fewer, same blocks in another order
        with pytest.raises(CacheMismatchError, match="layers"):
            _run(labelled_tree, cache, LazyBackbone(tiny_spec, "cpu", layers=other, loaded=tiny_backbone),
                 batch_size=1, workers=2)
        assert cache.segments() == shards_before  # nothing mixed in
    s = _run(labelled_tree, cache, LazyBackbone(tiny_spec, "cpu", layers=(1, 0), loaded=tiny_backbone))
    assert (s.new, s.cached) == (1, 24)  # -1,-2 spelled as absolute indices is the same setting


def test_model_load_failure_stops_run_once(tmp_path, make_image, monkeypatch):
    """A backbone that cannot load stops the run with one error, tried once (not once per file)."""
    for i in range(40):
        make_image(tmp_path / "in" / f"{i}.png", size=(40, 40), seed=i)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00 not a checkpoint" * 10)
    calls = {"n": 0}
    real = backbones_mod.create_backbone

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(backbones_mod, "create_backbone", counting)
    cache = FeatureCache(tmp_path / "c.h5")
    with pytest.raises(BackboneError, match="not a valid clipdet-tiny checkpoint"):
        extract(discover([str(tmp_path / "in")]), f"clipdet-tiny:{garbage}", cache=cache, workers=4,
                batch_size=4, device="cpu")
    assert calls["n"] == 1
    assert not cache.exists()


def test_interrupted_run_resumes(labelled_tree, tmp_path, lazy, tiny_backbone, monkeypatch):
    """A crash after some batches keeps their shards; the next run embeds only the rest, each once."""
    cache = FeatureCache(tmp_path / "c.h5")
    real_embed = tiny_backbone.embed
    calls = {"n": 0}

    def flaky(batch, layers=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_embed(batch, layers=layers)

    monkeypatch.setattr(tiny_backbone, "embed", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(labelled_tree, cache, lazy, batch_size=4)
    monkeypatch.setattr(tiny_backbone, "embed", real_embed)
    assert len(cache.segments()) == 2 and len(cache.cached_shas(lazy.key, "clean")) == 8
    s = _run(labelled_tree, cache, lazy, batch_size=4)
    assert (s.new, s.cached) == (16, 8)
    with single_segment(cache.path) as f:
        h = f[f"features/{lazy.key}/clean/sha256"][()]
        assert len(h) == len(set(h.tolist())) == 24
        assert len(f["images/sha256"]) == 24


def test_rerun_with_other_layers_refused_even_when_all_cached(labelled_tree, tmp_path, tiny_spec, lazy):
    """Asking for CLS tokens the cache does not hold must not report 'all cached' (nothing would be stored)."""
    cache = FeatureCache(tmp_path / "c.h5")
    _run(labelled_tree, cache, lazy)
    with pytest.raises(CacheMismatchError, match=r"extracted without --layers"):  # refused before any model load
        _run(labelled_tree, cache, LazyBackbone(tiny_spec, "cpu", layers=(-1,)))
    s = _run(labelled_tree, cache, LazyBackbone(tiny_spec, "cpu"))  # without --layers: all cached, no load
    assert (s.new, s.cached) == (0, 24)


@pytest.mark.parametrize("cached_first", [False, True])
def test_manifest_listing_a_path_twice_with_other_labels_is_a_conflict(tmp_path, make_image, lazy, cached_first):
    """#21 item 9: the second row's label was dropped silently; now it is recorded like any other conflict."""
    from clipdet.extract.discover import discover

    a, b = make_image(tmp_path / "imgs" / "a.png", seed=1), make_image(tmp_path / "imgs" / "b.png", seed=2)
    m = tmp_path / "m.csv"
    m.write_text("path,label,generator\nimgs/a.png,real,\nimgs/b.png,real,\nimgs/a.png,fake,gx\nimgs/b.png,0,\n")
    refs = discover([], manifest=str(m))
    assert [(r.label, r.also) for r in refs] == [("real", (("fake", "gx"),)), ("real", ())]
    cache = FeatureCache(tmp_path / "c.h5")
    if cached_first:  # extracted before (the stat index knows it, not racy) with one label
        for f in (a, b):
            os.utime(f, (time.time() - 60, time.time() - 60))
        _run([r.__class__(r.path, r.label) for r in refs], cache, lazy)
    _run(refs, cache, lazy)
    conflicts = FeatureCache(cache.path).conflicts()
    assert [c["sha256"] for c in conflicts] == [_sha(a)]
    assert {o[:2] for o in conflicts[0]["observations"]} == {("real", ""), ("fake", "gx")}
    lab = FeatureCache(cache.path).labelled(cache.groups()[0].key, "clean")
    assert int(lab["conflict"].sum()) == 1 and len(lab["label"]) == 2
    assert _sha(b) not in {c["sha256"] for c in conflicts}


@pytest.mark.parametrize("option", ["layers", "heads"])
def test_layers_or_heads_into_a_group_without_them_is_refused_before_the_model_is_built(
        tmp_path, make_image, lazy, tiny_spec, option, monkeypatch):
    from clipdet.errors import CacheMismatchError
    from clipdet.extract.lazy import LazyBackbone

    make_image(tmp_path / "in" / "a.png", seed=1)
    cache = FeatureCache(tmp_path / "c.h5")
    _run(tmp_path / "in", cache, lazy)
    make_image(tmp_path / "in" / "b.png", seed=2)
    fresh = LazyBackbone(tiny_spec, "cpu", key=lazy.key, **({"layers": (1,)} if option == "layers" else {"heads": 1}))

    def no_model(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(fresh, "get", no_model)
    with pytest.raises(CacheMismatchError, match=f"without --{option}; extract with --{option} into another"):
        extract(discover([str(tmp_path / "in")]), tiny_spec, cache=cache, lazy=fresh, device="cpu", workers=1)
    assert not fresh.loaded and len(FeatureCache(cache.path).cached_shas(lazy.key, "clean")) == 1
