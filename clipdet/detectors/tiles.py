"""How tile scores make an image's score, and a detector's tile calibration.

An image scored on native-resolution tiles (views tile:SIZE:0 ... tile:SIZE:COUNT-1) has one score per
tile. A rule turns them into the image's score: ``(1 - w) * mean + w * max`` of its tiles, with
``w`` = 0 ("mean"), 1 ("max") or in between ("mix:W"). `fit --tiles` learns ``w`` and the image-level
threshold from the references' out-of-fold tile scores (`clipdet.fit.tiles`) and stores them in the
detector's ``meta["tiles"]``; `TileCalibration` reads them back for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

#: the weights of max the learned rule chooses from (0 = mean, 1 = max)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def rule_name(weight: float) -> str:
    """"mean", "max" or "mix:W" for the rule with weight `weight` on the max."""
    w = float(weight)
    return "mean" if w == 0 else "max" if w == 1 else f"mix:{w:g}"


def parse_rule(rule: str | None) -> float | None:
    """The weight on the max for a rule name (mean, max, mix:W with 0 <= W <= 1); None for "auto"/None."""
    if rule is None or rule == "auto":
        return None
    r = str(rule).strip()
    if r in ("mean", "max"):
        return 0.0 if r == "mean" else 1.0
    kind, _, w = r.partition(":")
    try:
        weight = float(w) if kind == "mix" else float("nan")
    except ValueError:
        weight = float("nan")
    if not 0 <= weight <= 1:
        raise UsageError(f"--tile-rule {rule!r}: expected mean, max, mix:W (0 <= W <= 1) or auto")
    return weight


def mix(scores, weight: float) -> np.ndarray:
    """Per-image scores from (n, T) tile scores (NaN = a missing tile): (1 - w) mean + w max of the
    present tiles; NaN for an image with none."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"tile scores must be (images, tiles), got shape {s.shape}")
    out = np.full(len(s), np.nan)
    has = (~np.isnan(s)).any(axis=1)
    if has.any():
        w = float(weight)
        out[has] = (1.0 - w) * np.nanmean(s[has], axis=1) + w * np.nanmax(s[has], axis=1)
    return out


@dataclass(frozen=True)
class TileCalibration:
    """A detector's image-level calibration for scoring on tiles (from its ``meta["tiles"]``)."""

    size: int
    count: int
    weight: float
    threshold: float
    slope: float
    default: bool = True
    band: tuple[float, float] | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> TileCalibration | None:
        """The calibration stored by `fit --tiles`, or None for a detector fitted without it."""
        t = meta.get("tiles")
        if not t:
            return None
        band = t.get("unsure")
        return cls(int(t["size"]), int(t["count"]), float(t["weight"]), float(t["threshold"]),
                   float(t["slope"]), bool(t.get("default", True)),
                   (float(band["low"]), float(band["high"])) if band else None)

    @property
    def rule(self) -> str:
        """The rule's name."""
        return rule_name(self.weight)

    def proba(self, scores) -> np.ndarray:
        """P(fake) of image scores: sigmoid(slope (score - threshold)), 0.5 exactly at the threshold."""
        from .calibration import proba_at_threshold

        return proba_at_threshold(scores, max(self.slope, 1e-12), self.threshold)


def tile_decision(detector, calibration: TileCalibration | None, threshold: float | None = None):
    """(threshold, p_fake function) for tile-rule image scores: the tile calibration's own, unless a
    `threshold` is given or there is no calibration; then the detector's mapping at that threshold (or
    at its whole-image one)."""
    if calibration is not None and threshold is None:
        return calibration.threshold, calibration.proba
    t = detector.threshold if threshold is None else float(threshold)
    return t, lambda s: detector.proba_from_scores(s, t)
