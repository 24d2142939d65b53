"""Scoring on native-resolution tiles: each image is scored on `count` tile views (tile:N:0 ...) and the
tile scores are aggregated into the image's score by a rule (mean, max, or mix:W = (1-W) mean + W max;
`clipdet.detectors.tiles`).

Every tile view is a normal cached view (one row per image and tile), so the cache, the engines and
resumption work as for any view; a 2,000-px photo is judged on its own pixels, not on a thumbnail.
A detector fitted with `fit --tiles SIZE:COUNT` carries an image-level threshold, p_fake slope and
learned rule for those tiles, and they apply. Without one, the aggregated score goes through the
whole-image threshold, which was calibrated on single views: the false-positive rate then rises with
the number of tiles, most with ``max`` (the CLI says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..detectors.tiles import parse_tiles  # noqa: F401  (re-exported: the CLI and tests import it here)


def aggregate(scores: np.ndarray, rule: str = "mean") -> np.ndarray:
    """Per-image scores from (n, T) tile scores (NaN for a missing tile) by `rule` (mean, max or mix:W)."""
    from ..detectors.tiles import mix, parse_rule

    w = parse_rule(rule)
    return mix(scores, 0.0 if w is None else w)


#: what a tiled row adds to the output (tile scores ';'-joined, and the rule that made the image's score)
TILE_COLUMNS = ["tile_scores", "tile_rule"]


def tile_setting(detector, tiles: str | None, rule: str | None) -> tuple[int, int, float, object] | None:
    """(size, count, weight on the max, the detector's `TileCalibration` when it matches) for `score --tiles`,
    or None to score whole images. `tiles` None follows the detector (its tiles when fitted with them as the
    default view), "none" means whole images; `rule` None takes the detector's learned rule, else mean."""
    from ..detectors.tiles import TileCalibration, parse_rule

    cal = TileCalibration.from_meta(detector.meta)
    if tiles is None and not (cal and cal.default):
        return None
    if tiles is not None and str(tiles).strip().lower() == "none":
        return None
    size, count = (cal.size, cal.count) if tiles is None else parse_tiles(tiles)
    match = cal if cal and (cal.size, cal.count) == (size, count) else None
    weight = parse_rule(rule)
    if weight is None:
        weight = match.weight if match else 0.0
    return size, count, weight, match


def score_tiles(refs: Iterable, detector, size: int, count: int, rule: str | float = "mean",
                threshold: float | None = None, calibration=None, **kwargs) -> Iterator[dict]:
    """Rows as `score_refs` yields them, one per input in input order, scored on `count` tiles of `size`
    px and aggregated by `rule` (a name or the weight on the max); `kwargs` go to `score_refs` (cache,
    device, engine, ...). `calibration`: the detector's `TileCalibration` for these tiles, whose
    image-level threshold and p_fake apply (else the whole-image ones, which flag more reals, with max
    most). A row's "tiles" holds the tile scores, "tile_scores" the same as text."""
    from ..detectors.tiles import mix, parse_rule, rule_name, tile_decision
    from ..extract.views import tile_views
    from .stream import growing_chunks, score_refs

    weight = float(rule) if isinstance(rule, (int, float)) else parse_rule(rule)
    if weight is None:
        weight = calibration.weight if calibration else 0.0
    t, proba = tile_decision(detector, calibration, threshold)
    for part in growing_chunks(refs):
        per_view = [list(score_refs(part, detector, view=v, threshold=t, **kwargs)) for v in tile_views(size, count)]
        S = np.array([[np.nan if r.get("error") else r["score"] for r in rows] for rows in per_view]).T
        agg = mix(S, weight)
        p = proba(np.nan_to_num(agg))
        for i, row in enumerate(per_view[0]):
            row = dict(row)
            if not np.isnan(agg[i]):
                row.update(score=float(agg[i]), p_fake=float(p[i]), label="fake" if agg[i] >= t else "real",
                           error="")
            row["tiles"] = [None if np.isnan(x) else float(x) for x in S[i]]
            row["tile_scores"] = ";".join("" if np.isnan(x) else f"{x:.6g}" for x in S[i])
            row["tile_rule"] = rule_name(weight)
            yield row
