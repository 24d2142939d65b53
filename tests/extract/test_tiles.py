"""Native-resolution tile views (tile:N:K): a deterministic grid, no resize, one cached row per (image, tile)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipdet.errors import UsageError
from clipdet.extract.views import apply_view, canonical_view, parse_views, tile_grid, tile_views


def test_tile_grid_covers_the_image_edge_to_edge():
    assert tile_grid(2000, 224, 224) == [(222 * i, 0, 222 * i + 224, 224) for i in range(9)]  # 9 tiles, 2 px overlap
    boxes = tile_grid(500, 375, 224)
    assert len(boxes) == 3 * 2 and boxes[0] == (0, 0, 224, 224) and boxes[-1] == (276, 151, 500, 375)
    assert tile_grid(128, 100, 224) == [(0, 0, 128, 100)]  # smaller than a tile: the whole image


def test_tile_view_names_and_pixels(make_image, tmp_path):
    assert parse_views("tile:224:3,tile:0224:03") == ["clean", "tile:224:3"]
    assert canonical_view("tile:64") == "tile:64:0"
    assert tile_views(224, 3) == ["tile:224:0", "tile:224:1", "tile:224:2"]
    for bad in ("tile:4:0", "tile:224:-1", "tile:a:1"):
        with pytest.raises(UsageError, match="bad argument"):
            canonical_view(bad)
    img = Image.open(make_image(tmp_path / "t.png", size=(150, 70), seed=3)).convert("RGB")
    a = np.asarray(img)
    np.testing.assert_array_equal(np.asarray(apply_view(img, "tile:64:0")), a[0:64, 0:64])
    np.testing.assert_array_equal(np.asarray(apply_view(img, "tile:64:5")), a[6:70, 86:150])  # 3 x 2 grid
    np.testing.assert_array_equal(np.asarray(apply_view(img, "tile:64:6")), a[0:64, 0:64])  # wraps around


def test_backbone_resize_is_a_no_op_on_a_tile(make_image, tmp_path, tiny_backbone):
    """A tile of the model's own size reaches the model pixel for pixel (the preprocess keeps it as is)."""
    n = tiny_backbone.image_size
    img = Image.open(make_image(tmp_path / "big.png", size=(5 * n, 3 * n), seed=4)).convert("RGB")
    tile = apply_view(img, f"tile:{n}:7")
    x = tiny_backbone.preprocess(tile)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(tile))
