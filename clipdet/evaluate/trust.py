"""What `eval --stability` and every eval report beside the AUC: verdicts kept or left unsure, and
provenance marks per class (a shortcut to name, never a feature: no metric here feeds an AUC).

Both take the scored rows and the evaluation labels *after* scoring: scoring itself (views, band,
provenance) never sees a label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _rate(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else float("nan")


def trust_report(rows: Sequence[dict], y: np.ndarray, generators: Sequence[str],
                 views: Sequence[str] = ()) -> dict:
    """Coverage (share of images with a verdict), accuracy on decided images, unsure rate (overall, for
    reals, per generator), the share unsure because of a view flip or the band, and the flip rate per view.

    `rows`: scored rows with a `label` (real / fake / unsure) and `flips`; `y`: 1 fake / 0 real."""
    y = np.asarray(y)
    gens = np.asarray(generators, dtype=object)
    unsure = np.array([r.get("label") == "unsure" for r in rows], bool)
    flipped = np.array([bool(r.get("flips")) for r in rows], bool)
    pred = np.array([r.get("label") == "fake" for r in rows], bool)
    decided = ~unsure
    out = {
        "n": int(len(rows)), "coverage": _rate(decided),
        "accuracy_decided": float((pred[decided] == (y[decided] == 1)).mean()) if decided.any() else float("nan"),
        "unsure_rate": _rate(unsure), "unsure_real": _rate(unsure[y == 0]),
        "flip_rate": _rate(flipped), "band_only_rate": _rate(unsure & ~flipped),
        "unsure_per_generator": {g: _rate(unsure[(y == 1) & (gens == g)])
                                 for g in sorted({g for g, t in zip(gens, y) if t == 1})},
        "flip_rate_per_view": {v: _rate(np.array([v in (r.get("flips") or "").split(",") for r in rows], bool))
                               for v in views},
    }
    return out


def provenance_report(rows: Sequence[dict], y: np.ndarray, generators: Sequence[str]) -> dict:
    """Files carrying provenance marks, per class (real, fake, each generator): n, marked (any mark),
    ai_marked (a mark saying generated) and counts per mark source. Reported apart from every metric."""
    y = np.asarray(y)

    def count(idx) -> dict:
        sources: dict[str, int] = {}
        marked = ai = 0
        for i in idx:
            d = rows[i].get("provenance_details") or {}
            marks = d.get("marks") or []
            marked += bool(marks)
            ai += bool(d.get("ai"))
            for s in sorted({m.get("source") for m in marks}):
                sources[s] = sources.get(s, 0) + 1
        return {"n": len(idx), "marked": marked, "ai_marked": ai, "by_source": sources}

    out = {"real": count(np.flatnonzero(y == 0)), "fake": count(np.flatnonzero(y == 1)), "per_generator": {}}
    gens = np.asarray(generators, dtype=object)
    for g in sorted({g for g, t in zip(gens, y) if t == 1}):
        out["per_generator"][g] = count(np.flatnonzero((y == 1) & (gens == g)))
    return out


def provenance_note(report: dict) -> str | None:
    """A warning when marks tell the classes apart (a shortcut a benchmark could reward), else None."""
    r, f = report["real"], report["fake"]
    if not r["n"] or not f["n"]:
        return None
    rr, fr = r["marked"] / r["n"], f["marked"] / f["n"]
    if abs(rr - fr) < 0.05:
        return None
    return (f"provenance marks differ between classes ({fr:.0%} of fakes, {rr:.0%} of reals carry one): real and "
            "fake files come from different pipelines, a shortcut for any method reading metadata; clipdet's "
            "scores never use marks")


def pool_provenance(pool) -> dict:
    """`provenance_report` of a labelled pool's files, read at their recorded paths (`clipdet bench`); files
    that cannot be read any more are counted per class as `unread`."""
    from ..provenance import read_provenance_file

    rows, unread = [], {"real": 0, "fake": 0}
    for path, lab in zip(pool.path, pool.label):
        p = read_provenance_file(path) if path else None
        if p is None or (not p.marks and any("cannot read" in x for x in p.problems)):
            unread[lab] = unread.get(lab, 0) + 1
            rows.append({})
        else:
            rows.append({"provenance_details": p.to_dict()})
    rep = provenance_report(rows, pool.y, [g or "unknown" if lab == "fake" else "" for g, lab in
                                           zip(pool.generator, pool.label)])
    rep["real"]["unread"], rep["fake"]["unread"] = unread["real"], unread["fake"]
    return rep


def provenance_rows(report: dict) -> list[dict]:
    """Table rows (class, files, marked, ai_marked, sources) of a provenance report, for Markdown."""
    parts = [("real", report["real"]), ("fake", report["fake"])] + list(report["per_generator"].items())
    return [{"class": c, "files": d["n"], "marked": d["marked"], "ai_marked": d["ai_marked"],
             "sources": ", ".join(f"{k} {n}" for k, n in d["by_source"].items())} for c, d in parts]
