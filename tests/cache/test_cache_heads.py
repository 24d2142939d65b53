"""The cache stores the --heads decomposition (per-head contributions + the rest) beside the embedding:
round trip, merges, verify/repair, mismatched head sets, and a clear error when a group has none."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from test_cache import DIM, INFO, KEY, attrs, emb, sha
from test_cache_review import _flip

from clipdet.cache import FeatureCache, FeatureRows, ImageMeta
from clipdet.cache.verify import verify
from clipdet.errors import CacheError, CacheMismatchError

HEADS = {"blocks": [2, 3], "n_heads": 2}


def parts(ids) -> tuple[np.ndarray, np.ndarray]:
    """Per-head contributions (n, 4, DIM) and rest (n, DIM) for each id, deterministic."""
    h = np.stack([np.random.default_rng(i + 500).normal(size=(4, DIM)) for i in ids]).astype(np.float32)
    r = np.stack([np.random.default_rng(i + 900).normal(size=DIM) for i in ids]).astype(np.float32)
    return h, r


def write(fc: FeatureCache, ids, heads=HEADS, view="clean"):
    h, r = parts(ids)
    rows = FeatureRows([sha(i) for i in ids], emb(ids), heads=h if heads else None, heads_rest=r if heads else None)
    a = dict(attrs(), heads=heads)
    return fc.write_shard({(KEY, view): (rows, a)}, images=[ImageMeta(sha(i), "real") for i in ids])


def test_heads_round_trip_through_load_and_a_full_merge(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    write(fc, [1, 2])
    write(fc, [3])
    for full in (False, True):
        if full:
            fc.compact(full=True)
            assert len(fc.segments()) == 1
        r = fc.load(KEY, "clean", shas=[sha(3), sha(1)], with_heads=True)
        h, rest = parts([3, 1])
        assert r.sha256 == [sha(3), sha(1)] and r.heads.shape == (2, 4, DIM) and r.heads_rest.shape == (2, DIM)
        np.testing.assert_allclose(r.heads, h, atol=5e-3)
        np.testing.assert_allclose(r.heads_rest, rest, atol=5e-3)
        assert r.layers is None
    (g,) = fc.groups()
    assert g.heads == HEADS and fc.info()["features"][0]["heads"] == HEADS
    plain = fc.load(KEY, "clean")  # without with_heads: the embedding only
    assert plain.heads is None and len(plain.sha256) == 3


def test_load_with_heads_from_a_group_without_them_names_the_option(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    write(fc, [1], heads=None)
    with pytest.raises(CacheError, match="without --heads"):
        fc.load(KEY, "clean", with_heads=True)
    with pytest.raises(CacheError, match="without --heads"):
        fc.load(KEY, "clean", shas=[sha(1)], with_heads=True)


def test_another_head_set_is_a_mismatch(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    write(fc, [1])
    fc.check_compatible(INFO, "clean", [], HEADS)  # same settings: fine
    with pytest.raises(CacheMismatchError, match=r"heads blocks \[2, 3\] × 2 heads vs none"):
        fc.check_compatible(INFO, "clean", [])
    with pytest.raises(CacheMismatchError, match="heads"):
        fc.check_compatible(INFO, "clean", [], {"blocks": [3], "n_heads": 2})


def test_damaged_head_rows_are_found_by_verify_and_dropped_by_repair(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    p = write(fc, [1, 2, 3])
    write(fc, [4])
    _flip(p, f"features/{KEY}/clean/heads")
    fresh = FeatureCache(fc.path)
    with pytest.warns(UserWarning, match="damaged"):
        r = fresh.load(KEY, "clean", shas=[sha(i) for i in (1, 2, 3, 4)], with_heads=True)
    assert r.sha256 == [sha(4)]  # a row is whole only with its head contributions
    rep = verify(FeatureCache(fc.path), repair=True)
    assert not rep.ok and rep.repaired and len(rep.damaged) == 3
    after = FeatureCache(fc.path)
    assert verify(after).ok
    r = after.load(KEY, "clean", with_heads=True)
    assert r.sha256 == [sha(4)] and after.groups()[0].heads == HEADS
    with h5py.File(after.segments()[-1]) as f:
        assert {"heads", "heads_rest"} <= set(f[f"features/{KEY}/clean"])


def test_merge_refuses_segments_with_different_head_sets(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    write(fc, [1])
    write(fc, [2], heads=None)  # written past check_compatible (as a foreign tool could)
    with pytest.raises(CacheMismatchError, match="do not match"):
        fc.compact(full=True)
    assert len(FeatureCache(fc.path).load(KEY, "clean").sha256) == 2  # nothing lost


def test_cache_info_shows_heads_and_layers(tmp_path, run_cli):
    from test_cache import shard

    fc = FeatureCache(tmp_path / "c.h5")
    write(fc, [1])
    shard(fc, [2], view="jpeg:75", layers=(1, 0))
    r = run_cli("cache", "info", "--cache", fc.path)
    assert r.exit_code == 0, r.output
    (heads_line,) = [ln for ln in r.stdout.splitlines() if "view clean" in ln]
    assert "attention heads of blocks [2, 3] × 2" in heads_line, r.stdout
    (layers_line,) = [ln for ln in r.stdout.splitlines() if "view jpeg:75" in ln]
    assert "layers [1, 0]" in layers_line and "attention heads" not in layers_line, r.stdout
