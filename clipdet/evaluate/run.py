"""`clipdet eval`: score labelled images with a fitted detector and report honest metrics.

Evaluation images that are also the detector's references (same content hash) are refused unless
`exclude_references` drops them or `allow_overlap` keeps them; either way the report says how many.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Sequence

import numpy as np

from .._version import __version__
from ..errors import OverlapError, UsageError, printable
from ..extract.discover import ImageRef
from ..extract.views import canonical_view


def _labelled(rows: list[dict], refs_by_path: dict[str, ImageRef]):
    y, s, p, gens, preds, shas = [], [], [], [], [], []
    for r in rows:
        ref = refs_by_path[r["path"]]
        if r["error"] or ref.label not in ("real", "fake"):
            continue
        y.append(1 if ref.label == "fake" else 0)
        s.append(r["score"])
        p.append(r["p_fake"])
        gens.append(ref.generator or ("" if ref.label == "real" else "unknown"))
        preds.append(r)
        shas.append(r["sha256"])
    return np.array(y, dtype=np.int64), np.array(s, dtype=np.float64), np.array(p, dtype=np.float64), gens, preds, shas


def _conflicting(rows: list[dict], refs_by_path: dict[str, ImageRef], cache) -> set[str]:
    """Hashes of scored images whose labels disagree, among the inputs or in the cache's record."""
    from ..cache import FeatureCache
    from ..fit.pools import drop_conflicts

    seen_as: dict[str, list] = {}
    labels = {}
    for r in rows:
        ref = refs_by_path[r["path"]]
        if r["error"] or not r["sha256"]:
            continue
        seen_as.setdefault(r["sha256"], []).append((ref.label, ref.generator or "", ref.path))
        labels[r["sha256"]] = ref.label
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    return drop_conflicts(labels, seen_as, fc if fc.exists() else None)


def per_generator_auc(y: np.ndarray, scores: np.ndarray, generators: Sequence[str]) -> dict[str, float]:
    """AUC of each generator's fakes against all real images."""
    from .metrics import roc_auc

    gens = np.asarray(generators, dtype=object)
    real = y == 0
    out = {}
    for g in sorted({g for g, lab in zip(generators, y) if lab == 1}):
        mask = real | ((y == 1) & (gens == g))
        out[g] = roc_auc(y[mask], scores[mask])
    return out


def evaluate(
    refs: Sequence[ImageRef],
    detector,
    cache=None,
    views: Sequence[str] = (),
    allow_overlap: bool = False,
    exclude_references: bool = False,
    device: str = "auto",
    quiet: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    backbone: str | None = None,
    captions=None,
    stability: Sequence[str] | None = None,
    tiles: str | None = None,
    tile_rule: str | None = None,
) -> dict:
    """Metrics of `detector` on labelled `refs` (clean view, plus each robustness view); a JSON-able dict.

    Always: `provenance` (files carrying marks per class; never in a metric). `stability` (perturbed views;
    [] for the unsure band alone): rows are scored as `score --stability` does, without their labels, and
    `trust` reports coverage, accuracy on decided images and unsure rates (`clipdet.evaluate.trust`);
    the AUCs stay those of the scores.

    `backbone` overrides the detector's backbone spec (e.g. the weights file moved); same weights only.
    `captions` (a `clipdet.text.Captions`) for detectors fitted on caption features.
    `tiles`, `tile_rule`: as `score --tiles` (`clipdet.score.tiles.tile_setting`): a detector fitted with
    `fit --tiles` is evaluated on its tiles, with its image-level threshold; "none" evaluates whole images.
    """
    from ..detectors.tiles import rule_name, tile_decision
    from ..score.stream import score_refs
    from .metrics import binary_report, roc_auc

    refs = list(refs)
    labelled = [r for r in refs if r.label in ("real", "fake") or r.error]  # unusable inputs count as errors
    if not any(r.label in ("real", "fake") for r in labelled):
        raise UsageError("eval needs labelled images (layout real/** and fake/<generator>/**, or --manifest)")
    by_path = {r.path: r for r in labelled}
    kw = dict(cache=cache, device=device, quiet=quiet, batch_size=batch_size, workers=workers, backbone=backbone,
              captions=captions)
    if stability is not None:
        from ..score.stability import stability_views

        stability = stability_views(stability, detector.view)
    from ..score.tiles import score_tiles, tile_setting

    tiled = tile_setting(detector, tiles, tile_rule)
    threshold, notes = detector.threshold, []
    if tiled:
        size, count, weight, cal = tiled
        if stability is not None:
            raise UsageError("--tiles and --stability cannot be combined yet: evaluate tiles or stability")
        rows = list(score_tiles(labelled, detector, size, count, weight, calibration=cal, **kw))
        threshold = tile_decision(detector, cal)[0]
        notes.append(f"scored on tiles {size}:{count}, rule {rule_name(weight)}, "
                     + ("the detector's image-level threshold" if cal is not None else
                        "the whole-image threshold (this detector has no calibration for these tiles: it flags "
                        "more real images)"))
    else:
        rows = list(score_refs(labelled, detector, stability=stability, **kw))
    ref_shas = detector.reference_shas
    overlap = {r["sha256"] for r in rows if r["sha256"] in ref_shas}
    if detector.backbone.get("weights") == "random":
        notes.append("the backbone has RANDOM weights: these numbers say nothing about detection quality "
                     "(use pretrained weights, e.g. ViT-L-14:openai)")
    notes += [n for n in detector.meta.get("notes", []) if n.startswith("calibration")]  # said at fit, said again
    if overlap and not (allow_overlap or exclude_references):
        raise OverlapError(
            f"{len(overlap)} evaluation image(s) are references of the detector (same content); "
            "use --exclude-references to drop them, or --allow-overlap to keep them (optimistic metrics)"
        )
    if overlap and exclude_references:
        rows = [r for r in rows if r["sha256"] not in overlap]
        notes.append(f"{len(overlap)} evaluation image(s) were detector references and were excluded")
    elif overlap:
        notes.append(f"{len(overlap)} evaluation image(s) are detector references (kept: --allow-overlap); "
                     "metrics are optimistic")
    conflicting = _conflicting(rows, by_path, cache)
    if conflicting:
        rows = [r for r in rows if r["sha256"] not in conflicting]
        notes.append(f"{len(conflicting)} evaluation image(s) with conflicting labels were excluded "
                     "(clipdet cache conflicts lists them)")
    errors = [{"path": r["path"], "error": r["error"]} for r in rows if r["error"]]
    y, s, p, gens, scored, shas = _labelled(rows, by_path)
    if len(y) == 0:
        raise UsageError("no evaluation image could be scored")
    report = binary_report(y, s, p, threshold=threshold)
    notes += report.pop("notes", [])
    result = {
        "detector": {"head": detector.meta.get("head"), "backbone": detector.backbone.get("spec"),
                     "backbone_weights": detector.backbone.get("weights"),
                     "view": f"tiles {tiled[0]}:{tiled[1]}" if tiled else detector.view,
                     "features": detector.features, "threshold": threshold,
                     "target_fpr": detector.meta.get("target_fpr"), "shots": detector.meta.get("shots"),
                     "seed": detector.meta.get("seed")},
        "n_inputs": len(refs), "n_unlabelled": len(refs) - len(labelled), "n_errors": len(errors),
        "n_conflicting": len(conflicting),
        "overlap": {"count": len(overlap), "policy": "excluded" if exclude_references else
                    ("allowed" if allow_overlap else "none")},
        "metrics": report,
        "per_generator_auc": per_generator_auc(y, s, gens),
        "per_generator_n": {g: int(sum(1 for gg, yy in zip(gens, y) if yy == 1 and gg == g))
                            for g in sorted({g for g, yy in zip(gens, y) if yy == 1})},
        "n_real": int((y == 0).sum()),
        "generators_not_evaluated": sorted(set(detector.meta.get("generators") or [])
                                           - {g for g, yy in zip(gens, y) if yy == 1}),
        "notes": notes, "errors": errors[:100],
        "clipdet_version": __version__, "python": platform.python_version(),
        "_curves": {"clean": (y, s)}, "_p": p,
    }
    from .trust import provenance_note, provenance_report, trust_report

    result["provenance"] = provenance_report(scored, y, gens)
    note = provenance_note(result["provenance"])
    if note:
        notes.append(note)
    if stability is not None:
        result["trust"] = trust_report(scored, y, gens, stability)
    if detector.attribution is not None:
        result["attribution"] = attribution_matrix(y, gens, scored, detector.meta.get("generators") or [])
    robust = {}
    for v in views:
        v = canonical_view(v)
        if v == detector.view:
            continue
        vrows = list(score_refs([by_path[r["path"]] for r in rows if not r["error"]], detector, view=v,
                                provenance=False, **kw))
        vy, vs, vp, _, _, _ = _labelled(vrows, by_path)
        robust[v] = {"auc": roc_auc(vy, vs), "n": int(len(vy)),
                     "accuracy": float(np.mean((vs >= detector.threshold) == (vy == 1))) if len(vy) else float("nan")}
        result["_curves"][v] = (vy, vs)
    if robust:
        robust = {result["detector"]["view"]: {"auc": report["auc"], "n": int(len(y)),
                                               "accuracy": report["accuracy"]}, **robust}
        if tiled:
            notes.append("the perturbed views (--views) are scored on whole images, at the whole-image threshold")
        result["robustness"] = robust
    return result


def json_safe(value):
    """Copy of `value` with NaN/inf floats as None, numpy scalars as Python numbers (strict JSON) and
    non-UTF-8 file names backslash-escaped as everywhere else (`printable`)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if np.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def public(result: dict) -> dict:
    """The result without its private arrays (for JSON)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def attribution_matrix(y, gens, scored, known_gens) -> dict:
    """Rows: the true classes (real, each evaluated generator; one the detector never saw is marked
    `(unseen)`); columns: what the detector can answer (real, its generators, `unknown`), nothing else.
    Counts, row-normalised shares, and the accuracy on the classes the detector knows."""
    known_gens = list(known_gens)
    true = ["real" if yy == 0 else (g if g in known_gens else f"{g or 'fake, no generator'} (unseen)")
            for yy, g in zip(y, gens)]
    pred = ["real" if r["label"] == "real" else (r.get("generator") or "unknown") for r in scored]
    rows = ["real"] + [g for g in known_gens if g in true] + sorted({t for t in true if t.endswith(" (unseen)")})
    columns = ["real"] + known_gens + sorted(set(pred) - {"real", "unknown"} - set(known_gens)) + ["unknown"]
    from .metrics import confusion_matrix

    _, counts = confusion_matrix(true, pred, rows, columns=columns)
    known = [i for i, t in enumerate(true) if t == "real" or t in known_gens]
    acc = float(np.mean([true[i] == pred[i] for i in known])) if known else float("nan")
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    return {"rows": rows, "columns": columns, "labels": rows, "matrix": counts.tolist(),
            "row_normalised": frac.tolist(), "accuracy_on_known": acc}


def write_report(result: dict, directory: str) -> str:
    """Markdown report with ROC curves, score histograms, per-generator bars and attribution matrix."""
    from .plots import plot_bars, plot_confusion, plot_roc, plot_score_hist
    from .report import markdown_table, random_weights_warning, write_markdown_report

    os.makedirs(directory, exist_ok=True)
    m = result["metrics"]
    y, s = result["_curves"]["clean"]
    plot_roc(result["_curves"], os.path.join(directory, "roc.png"), title="ROC (per view)")
    plot_score_hist(y, s, result["detector"]["threshold"], os.path.join(directory, "scores.png"),
                    title="Scores by class (line: calibrated threshold)")
    sections = []
    d = result["detector"]
    sections.append(("Detector", (
        f"{d['head']} head on `{d['backbone']}` (view {d['view']}), shots {d['shots']}, seed {d['seed']}; "
        f"threshold {d['threshold']:.4g} calibrated on references at target FPR {d['target_fpr']}.\n\n"
        f"{result['n_inputs']} inputs, {result['n_unlabelled']} unlabelled, {result['n_errors']} unreadable; "
        f"overlap with references: {result['overlap']['count']} ({result['overlap']['policy']})."), []))
    rows = [{"metric": k, "value": v} for k, v in m.items()]
    sections.append(("Metrics", markdown_table(rows, ["metric", "value"]), ["roc.png", "scores.png"]))
    if result["per_generator_auc"]:
        plot_bars(result["per_generator_auc"], os.path.join(directory, "per_generator_auc.png"),
                  title=f"AUC per generator (its fakes vs all {result['n_real']:,} real images)", ylabel="AUC",
                  chance=0.5,
                  counts=result.get("per_generator_n"), excluded=result.get("generators_not_evaluated", []))
        rows = [{"generator": g, "auc": a} for g, a in result["per_generator_auc"].items()]
        sections.append(("Per generator", markdown_table(rows, ["generator", "auc"]), ["per_generator_auc.png"]))
    if "robustness" in result:
        rows = [{"view": v, **r} for v, r in result["robustness"].items()]
        plot_bars({v: r["auc"] for v, r in result["robustness"].items()}, os.path.join(directory, "robustness.png"),
                  title="AUC per view (real and fake perturbed alike)", ylabel="AUC", chance=0.5)
        sections.append(("Robustness", markdown_table(rows, ["view", "auc", "accuracy", "n"]), ["robustness.png"]))
    if "attribution" in result:
        a = result["attribution"]
        counts = np.array(a["matrix"])
        cols = a.get("columns", a["labels"])
        plot_confusion(a["labels"], counts, os.path.join(directory, "attribution.png"), columns=cols,
                       title="Attribution (rows: true, row-normalised; counts in brackets)", normalise=True)
        table = [{"true \\ predicted": t, **{p: f"{f:.2f} ({int(c)})" for p, f, c in zip(cols, fr, row)},
                  "images": int(row.sum())}
                 for t, fr, row in zip(a["labels"], a["row_normalised"], counts)]
        sections.append(("Attribution", f"Accuracy on known classes: {a['accuracy_on_known']:.3f}. Each row "
                         "is row-normalised (the share of that true class given each prediction), with the "
                         "image count in brackets.\n\n" + markdown_table(table), ["attribution.png"]))
    if "trust" in result:
        t = result["trust"]
        rows = [{"measure": k, "value": v} for k, v in t.items() if not isinstance(v, dict)]
        rows += [{"measure": f"unsure rate, {g}", "value": v} for g, v in t["unsure_per_generator"].items()]
        rows += [{"measure": f"flip rate, {v}", "value": r} for v, r in t["flip_rate_per_view"].items()]
        sections.append(("Verdicts you can trust", "Labels 'unsure' when the verdict changes on a perturbed view or "
                         "the score is in the detector's unsure band (set from references only; no evaluation "
                         "label is read while scoring). AUCs above use the scores of every image.\n\n"
                         + markdown_table(rows, ["measure", "value"]), []))
    p = result.get("provenance")
    if p:
        from .trust import provenance_rows

        rows = provenance_rows(p)
        sections.append(("Provenance marks (not used in any metric)", "Files carrying C2PA, XMP DigitalSourceType, "
                         "generator PNG text or EXIF Software marks. A mark is not part of any score; missing "
                         "marks prove nothing.\n\n" + markdown_table(rows, ["class", "files", "marked",
                                                                               "ai_marked", "sources"]), []))
    if result["notes"]:
        sections.append(("Notes", "\n".join(f"- {n}" for n in result["notes"]), []))
    path = write_markdown_report(directory, "clipdet evaluation", sections,
                                 warning=random_weights_warning({"weights": d.get("backbone_weights")}))
    with open(os.path.join(directory, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(json_safe(public(result)), f, indent=1, allow_nan=False)
    return str(path)
