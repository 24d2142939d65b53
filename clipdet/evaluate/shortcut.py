"""The format shortcut check: does re-encoding every image the same way change the scores?"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from ..fit.pools import Pool

SHORTCUT_VIEW = "jpeg:95"


def format_shortcut(rows: Iterable[Mapping], view: str = SHORTCUT_VIEW, clean_view: str = "clean",
                    tolerance: float = 0.02) -> list[dict]:
    """The format-shortcut check from robustness rows, one dict per head.

    Compares AUC on the clean files with AUC when every image is re-encoded the same way (`view`):
    `auc_clean`, `auc_reencoded` (clean-fitted detector), `auc_refit` (fitted and tested on re-encoded
    features), `delta` = auc_reencoded - auc_clean with its 95% half-width `delta_ci95` over paired
    seeds, `delta_refit`, and a `verdict`. A drop beyond `tolerance` suggests the detector leans on how
    the files were encoded (e.g. real JPEG vs fake PNG) rather than on content.
    """
    from ..extract.views import canonical_view
    from .stats import mean_ci

    view, clean_view = canonical_view(view), canonical_view(clean_view)
    by: dict[tuple[str, str, str, int], float] = {}
    heads: list[str] = []
    for r in rows:
        by[(r["head"], r["fit_view"], r["view"], r["seed"])] = float(r["auc"])
        if r["head"] not in heads:
            heads.append(r["head"])
    out = []
    for h in heads:
        seeds = sorted(s for (hh, fv, v, s) in by if hh == h and fv == clean_view and v == clean_view)
        pairs = [(by[(h, clean_view, clean_view, s)], by[(h, clean_view, view, s)]) for s in seeds
                 if (h, clean_view, view, s) in by]
        if not pairs:
            continue
        refit = [by[(h, view, view, s)] for s in seeds if (h, view, view, s) in by]
        clean_auc = float(np.mean([a for a, _ in pairs]))
        re_auc = float(np.mean([b for _, b in pairs]))
        delta, half = mean_ci([b - a for a, b in pairs])
        refit_auc = float(np.mean(refit)) if refit else math.nan
        if delta < -tolerance:
            verdict = (f"AUC drops by {-delta:.3f} when every image is re-encoded as {view}: "
                       "the detector may rely on file format or compression, not content")
        elif delta > tolerance:
            verdict = f"AUC rises by {delta:.3f} after re-encoding as {view} (unexpected; check the data)"
        else:
            verdict = f"no sign of a format shortcut (|change| <= {tolerance:g})"
        out.append({"head": h, "view": view, "n": len(pairs), "auc_clean": clean_auc, "auc_reencoded": re_auc,
                    "delta": delta, "delta_ci95": half, "auc_refit": refit_auc,
                    "delta_refit": refit_auc - clean_auc, "verdict": verdict})
    return out


def format_breakdown(pool: Pool, formats: Mapping[str, str]) -> dict:
    """File formats per class (`formats`: sha256 → format, e.g. from the cache's image records).

    Returns {"rows": [{label, format, count, fraction}], "total_variation": distance between the real
    and fake format distributions (0 = identical mix, 1 = no format in common: a shortcut risk)}.
    """
    counts: dict[str, dict[str, int]] = {"real": {}, "fake": {}}
    for s, lab in zip(pool.sha256, pool.label):
        fmt = (formats.get(s) or "unknown").upper()
        counts[lab][fmt] = counts[lab].get(fmt, 0) + 1
    rows = []
    for lab in ("real", "fake"):
        n = sum(counts[lab].values())
        for fmt in sorted(counts[lab]):
            rows.append({"label": lab, "format": fmt, "count": counts[lab][fmt],
                         "fraction": counts[lab][fmt] / n if n else math.nan})
    fmts = set(counts["real"]) | set(counts["fake"])
    nr, nf = sum(counts["real"].values()), sum(counts["fake"].values())
    tv = (0.5 * sum(abs(counts["real"].get(f, 0) / nr - counts["fake"].get(f, 0) / nf) for f in fmts)
          if nr and nf else math.nan)
    return {"rows": rows, "total_variation": float(tv)}
