"""Scoring on native-resolution tiles: each image is scored on `count` tile views (tile:N:0 ...) and the
tile scores are aggregated (mean or max) into the image's score.

Every tile view is a normal cached view (one row per image and tile), so the cache, the engines and
resumption work as for any view; a 2,000-px photo is judged on its own pixels, not on a thumbnail.
The aggregated score goes through the detector's threshold and p_fake mapping; the threshold was
calibrated on single views, so with ``max`` the false-positive rate rises with the number of tiles
(recalibrate with a tile-fitted detector, or prefer ``mean``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import UsageError

RULES = ("mean", "max")


def parse_tiles(spec: str) -> tuple[int, int]:
    """"N:T" (tile size, number of tiles) → (N, T); "224" means one tile."""
    size, _, count = str(spec).partition(":")
    try:
        n, t = int(size), int(count or 1)
    except ValueError:
        n = t = 0
    if n < 8 or t < 1:
        raise UsageError(f"--tiles {spec!r}: expected SIZE:COUNT, e.g. 224:4 (four 224-px tiles)")
    return n, t


def aggregate(scores: np.ndarray, rule: str = "mean") -> np.ndarray:
    """Per-image scores from (n, T) tile scores (NaN for a missing tile) by `rule` (mean | max)."""
    if rule not in RULES:
        raise UsageError(f"--tile-rule {rule!r}: expected {' or '.join(RULES)}")
    s = np.asarray(scores, dtype=np.float64)
    ok = ~np.isnan(s)
    out = np.full(len(s), np.nan)
    has = ok.any(axis=1)
    if rule == "mean":
        out[has] = np.nanmean(s[has], axis=1)
    else:
        out[has] = np.nanmax(s[has], axis=1)
    return out


def score_tiles(refs: Iterable, detector, size: int, count: int, rule: str = "mean",
                threshold: float | None = None, **kwargs) -> Iterator[dict]:
    """Rows as `score_refs` yields them, one per input in input order, scored on `count` tiles of `size`
    px and aggregated by `rule`; `kwargs` go to `score_refs` (cache, device, engine, ...). A row's
    "tiles" holds the tile scores."""
    from ..extract.views import tile_views
    from .stream import growing_chunks, score_refs

    aggregate(np.zeros((0, 1)), rule)  # validate before any work
    t = detector.threshold if threshold is None else threshold
    for part in growing_chunks(refs):
        per_view = [list(score_refs(part, detector, view=v, threshold=t, **kwargs)) for v in tile_views(size, count)]
        S = np.array([[np.nan if r.get("error") else r["score"] for r in rows] for rows in per_view]).T
        agg = aggregate(S, rule)
        p = detector.proba_from_scores(np.nan_to_num(agg), t)
        for i, row in enumerate(per_view[0]):
            row = dict(row)
            if not np.isnan(agg[i]):
                row.update(score=float(agg[i]), p_fake=float(p[i]), label="fake" if agg[i] >= t else "real",
                           error="")
            row["tiles"] = [None if np.isnan(x) else float(x) for x in S[i]]
            yield row
