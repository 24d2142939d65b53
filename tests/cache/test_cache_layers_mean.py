"""Per-block patch-token means ("layers_mean") stored beside the CLS tokens; older caches keep working."""

from __future__ import annotations

import numpy as np
import pytest
from test_cache import DIM, INFO, KEY, attrs, emb, sha

from clipdet.cache import FeatureCache, FeatureRows, ImageMeta
from clipdet.errors import CacheError


def _shard(c: FeatureCache, ids, means: bool):
    layers = np.stack([emb([i + 1000, i + 2000]) for i in ids])
    mean = np.stack([emb([i + 3000, i + 4000]) for i in ids]) if means else None
    rows = FeatureRows([sha(i) for i in ids], emb(ids), layers, layers_mean=mean)
    metas = [ImageMeta(sha(i), "real", "", 10, 10, "PNG", [f"/img/{i}.png"]) for i in ids]
    c.write_shard({(KEY, "clean"): (rows, attrs((1, 0), INFO))}, images=metas)


@pytest.fixture
def fc(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "c" / "clipdet.h5")


def test_layers_mean_round_trip(fc):
    _shard(fc, [1, 2], means=True)
    r = fc.load(KEY, "clean", with_layers=True)
    assert r.layers_mean.shape == (2, 2, DIM) and r.layers_mean.dtype == np.float32
    np.testing.assert_allclose(r.layers_mean[1], emb([3002, 4002]), atol=2e-3)
    fc.compact(full=True)
    r = fc.load(KEY, "clean", shas=[sha(2)], with_layers_mean=True)
    np.testing.assert_allclose(r.layers_mean[0], emb([3002, 4002]), atol=2e-3)
    assert r.layers is None  # only what was asked for


def test_old_cache_without_means_still_loads_and_says_how_to_get_them(fc):
    _shard(fc, [1, 2], means=False)  # a cache written before layers_mean existed
    r = fc.load(KEY, "clean", with_layers=True)
    assert r.layers.shape == (2, 2, DIM) and r.layers_mean is None
    with pytest.raises(CacheError, match="extract again into a new cache with --layers"):
        fc.load(KEY, "clean", with_layers_mean=True)


def test_mixed_segments_and_merge(fc):
    _shard(fc, [1, 2], means=False)
    _shard(fc, [3], means=True)
    r = fc.load(KEY, "clean", with_layers=True)
    assert r.sha256 == [sha(1), sha(2), sha(3)] and r.layers_mean is None  # no half-filled means
    assert fc.load(KEY, "clean", shas=[sha(3)], with_layers=True).layers_mean.shape == (1, 2, DIM)
    fc.compact(full=True)  # old and new segments merge; the means only some held are dropped
    r = fc.load(KEY, "clean", with_layers=True)
    assert len(r.sha256) == 3 and r.layers_mean is None
    np.testing.assert_allclose(r.layers[2], emb([1003, 2003]), atol=2e-3)
