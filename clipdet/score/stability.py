"""Verdicts people can trust: the stability check over perturbed views and the detector's unsure band.

A row's label becomes "unsure" when its verdict is not the same on the clean image and on every
perturbed view (`--stability`: a JPEG re-save, a resize, a crop...), or when its score lies in the
detector's unsure band (set at fit from the references' cross-validated scores only). Nothing here
reads evaluation labels. Perturbed views are embedded through the same extract path as clean images,
into a read-only overlay of the cache (kept in memory, dropped after each chunk) unless the caller
consents to caching them (`score --stability-cache`). Cost: one decode (two for images whose clean view
is new to the cache: the cache's pass and the overlay's), the views and one embedding per view per image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..extract.views import parse_views

#: A small default set: a social-media JPEG re-save, a halving resize, a centre crop at model size.
DEFAULT_STABILITY_VIEWS = ("jpeg:75", "resize:0.5", "crop:224")
STABILITY_COLUMNS = ["stable", "score_min", "score_max", "flips", "unsure_reason"]
UNSURE = "unsure"


def stability_views(spec: str | Iterable[str] | None, detector_view: str = "clean") -> list[str]:
    """Canonical perturbed views of a --stability-views value (None: the default set; '' or 'none': none,
    the unsure band only), without the detector's own view."""
    if spec is None:
        spec = DEFAULT_STABILITY_VIEWS
    if isinstance(spec, str) and spec.strip().lower() in ("", "none"):
        return []
    return [v for v in parse_views(spec)[1:] if v != detector_view]


def judge(score: float, view_scores: dict[str, float], threshold: float,
          band: tuple[float, float] | None) -> dict:
    """The stability fields of one row: stable, score_min, score_max, flips (views whose verdict differs
    from the clean one, ','-joined) and unsure_reason ('' when the verdict stands).

    A view whose score is missing (NaN) is ignored."""
    fake = score >= threshold
    scores = [score] + [s for s in view_scores.values() if not math.isnan(s)]
    flips = [v for v, s in view_scores.items() if not math.isnan(s) and (s >= threshold) != fake]
    reasons = []
    if flips:
        was = "fake" if fake else "real"
        reasons.append(f"the verdict changes from {was} under {', '.join(flips)}")
    if band is not None and band[0] <= score < band[1]:
        reasons.append(f"the score {score:.4g} is in the unsure band [{band[0]:.4g}, {band[1]:.4g}) where the "
                       "references' cross-validated verdicts are not accurate enough")
    return {"stable": not flips, "score_min": min(scores), "score_max": max(scores), "flips": ",".join(flips),
            "unsure_reason": "; ".join(reasons)}


def apply_judgement(row: dict, view_scores: dict[str, float], threshold: float,
                    band: tuple[float, float] | None) -> dict:
    """`row` (a scored row) with the stability fields; its label becomes 'unsure' when there is a reason."""
    row.update(judge(row["score"], view_scores, threshold, band))
    if row["unsure_reason"]:
        row["label"] = UNSURE
    return row


def overlay(cache, consent: bool):
    """Where perturbed views' features go: the cache itself with `consent`, else a read-only overlay of
    it (reads what is cached, keeps new rows in memory only)."""
    from ..cache import FeatureCache

    if consent or cache.readonly:
        return cache
    return FeatureCache(cache.path, readonly=True)
