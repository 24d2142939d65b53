"""What `score --stability` buys and costs on aigi-dev: flip rate per view and per generator, unsure rate,
accuracy on decided images, coverage, and the extra time per image.

Fits the default detector (svm, calibrated on its references by cross-validation, unsure band from the
same scores) from --shots references per class drawn with --seed, then scores every other image of the
(optionally --limit'ed, seeded and stratified) set with and without --stability. Labels are read only
to measure the rows afterwards. Timing: each scoring pass runs --repeats times over the same images with
their clean features already cached, so the difference is the stability check itself (decode, views,
their embeddings, in memory); the median over repeats of ms per image is reported.

    .venv/bin/python benchmarks/stability.py --backbone onnx:/path/to/dinov2-s.onnx --cache /tmp/stab.h5
    .venv/bin/python benchmarks/stability.py --backbone clipdet-tiny:random --cache /tmp/stab-tiny.h5 --limit 60
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clipdet  # noqa: E402
from clipdet.cache import FeatureCache  # noqa: E402
from clipdet.detectors.detector import Detector  # noqa: E402
from clipdet.evaluate.metrics import roc_auc  # noqa: E402
from clipdet.evaluate.trust import trust_report  # noqa: E402
from clipdet.extract.discover import read_manifest  # noqa: E402
from clipdet.extract.lazy import LazyBackbone  # noqa: E402
from clipdet.score.stability import DEFAULT_STABILITY_VIEWS, stability_views  # noqa: E402
from clipdet.score.stream import score_refs  # noqa: E402

RANDOM_NOTE = ("**The backbone has RANDOM weights: these flip rates, unsure rates and accuracies mean nothing "
               "about detection; only the mechanics and the timings are real.**")


def cpu_name() -> str:
    """CPU model name from lscpu (platform's guess when lscpu is missing), and the CPU count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip() or platform.processor()
    except OSError:
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs"


def subset(refs, limit: int | None, seed: int):
    """A seeded subset of `limit` images keeping the real/fake and per-generator proportions."""
    if not limit or limit >= len(refs):
        return list(refs)
    rng = np.random.default_rng(seed)
    groups: dict[str, list] = {}
    for r in refs:
        groups.setdefault(r.generator if r.label == "fake" else "real", []).append(r)
    out = []
    for _g, members in sorted(groups.items()):
        k = max(1, round(limit * len(members) / len(refs)))
        out += [members[i] for i in sorted(rng.choice(len(members), min(k, len(members)), replace=False))]
    return out


def score_pass(refs, det, cache, stability, repeats: int, device: str):
    """(rows of the last pass, seconds per pass) scoring `refs` from a read-only view of the cache."""
    times, rows = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = list(score_refs(refs, det, cache=FeatureCache(cache, readonly=True), stability=stability,
                               provenance=False, device=device, quiet=True))
        times.append(time.perf_counter() - t0)
    return rows, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", required=True, help="backbone spec (ARCH:WEIGHTS, onnx:PATH, clipdet-tiny:random)")
    ap.add_argument("--cache", required=True, help="feature cache (clean features are added; views never are)")
    ap.add_argument("--data", default="/work/shared/data/aigi-dev", help="folder with manifest.csv")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", default=",".join(DEFAULT_STABILITY_VIEWS))
    ap.add_argument("--limit", type=int, default=None, help="score a seeded, stratified subset of N images")
    ap.add_argument("--repeats", type=int, default=3, help="timing passes with and without --stability")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="/tmp/clipdet-stability", help="folder for the subset manifest and detector")
    ap.add_argument("--out", default=None, help="output prefix [benchmarks/results/stability_<backbone>]")
    a = ap.parse_args()
    tag = a.backbone.split(":", 1)[0].replace("/", "_") + ("-random" if a.backbone.endswith(":random") else "")
    out = a.out or os.path.join("benchmarks", "results", f"stability_{tag}" + (f"_limit{a.limit}" if a.limit else ""))
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)

    refs = subset(read_manifest(os.path.join(a.data, "manifest.csv")), a.limit, a.seed)
    man = os.path.join(a.work, "subset.csv")
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator"])
        for r in refs:
            w.writerow([os.path.abspath(r.path), r.label, r.generator or ""])
    lazy = LazyBackbone(a.backbone, device=a.device)
    t0 = time.perf_counter()
    ext = clipdet.extract(refs, a.backbone, cache=a.cache, lazy=lazy, device=a.device)
    t_extract = time.perf_counter() - t0
    det = clipdet.fit(manifest=man, backbone=a.backbone, cache=a.cache, shots=a.shots, seed=a.seed, device=a.device)
    det_path = det.save(os.path.join(a.work, "detector.clipdet"))
    det = Detector.load(det_path)
    ref_shas = det.reference_shas
    sha_of = dict((p, s) for p, s, e in ext.records if not e)
    rest = [r for r in refs if sha_of.get(r.path) and sha_of[r.path] not in ref_shas]
    views = stability_views(a.views, det.view)

    _, t_plain = score_pass(rest, det, a.cache, None, a.repeats, a.device)
    stab_rows, t_stab = score_pass(rest, det, a.cache, views, a.repeats, a.device)
    t_load = []  # every --stability pass loads the model once (a cached clean pass never does): a fixed cost
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        LazyBackbone(a.backbone, device=a.device, key=det.backbone_key).get()
        t_load.append(time.perf_counter() - t0)
    load = statistics.median(t_load)
    n = len(rest)
    ms_plain = statistics.median(t / n * 1000 for t in t_plain)
    ms_stab = statistics.median((t - load) / n * 1000 for t in t_stab)

    by_path = {r.path: r for r in rest}
    ok = [row for row in stab_rows if not row["error"]]
    y = np.array([1 if by_path[row["path"]].label == "fake" else 0 for row in ok])
    gens = [by_path[row["path"]].generator or "unknown" if yy else "" for row, yy in zip(ok, y)]
    trust = trust_report(ok, y, gens, views)
    scores = np.array([row["score"] for row in ok])
    acc_all = float(((scores >= det.threshold) == (y == 1)).mean())

    # flip rate per view, for reals and per generator
    table = []
    for cls in ["real"] + sorted({g for g in gens if g}):
        idx = [i for i, (g, yy) in enumerate(zip(gens, y)) if (yy == 0 if cls == "real" else g == cls)]
        sel = [ok[i] for i in idx]
        rec = {"class": cls, "n": len(sel),
               "unsure_rate": float(np.mean([r["label"] == "unsure" for r in sel])) if sel else float("nan")}
        for v in views:
            flips = [v in (r["flips"] or "").split(",") for r in sel]
            rec[f"flip_{v}"] = float(np.mean(flips)) if sel else float("nan")
        dec = [r for r in sel if r["label"] != "unsure"]
        rec["accuracy_decided"] = (float(np.mean([(r["label"] == "fake") == (cls != "real") for r in dec]))
                                   if dec else float("nan"))
        table.append(rec)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)

    band = det.meta.get("unsure") or {}
    random_w = det.backbone.get("weights") == "random"
    import torch

    lines = [f"# Stability check: {a.backbone}", "",
             "```", "python benchmarks/stability.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]), "```", "",
             f"Machine: {cpu_name()}; device {a.device}; Python {platform.python_version()}, "
             f"torch {torch.__version__}, clipdet {clipdet.__version__}.", ""]
    if random_w:
        lines += [RANDOM_NOTE, ""]
    lines += [
        f"Data: {a.data} ({len(refs)} images{f', seeded stratified subset --limit {a.limit}' if a.limit else ''}); "
        f"detector: {det.summary()}.", "",
        f"Unsure band (from the {band.get('n', 0)} references' cross-validated scores only, accuracy level "
        f"{band.get('accuracy', float('nan')):.2f}): [{band.get('low', float('nan')):.4g}, "
        f"{band.get('high', float('nan')):.4g}); threshold {det.threshold:.4g}.", "",
        f"Scored: {n} images not used as references ({int((y == 0).sum())} real, {int((y == 1).sum())} fake); "
        f"views {', '.join(views)}.", "",
        "| measure | value |", "|---|---|",
        f"| AUC (clean scores, every image) | {roc_auc(y, scores):.3f} |",
        f"| accuracy without --stability (every image decided) | {acc_all:.3f} |",
        f"| coverage with --stability (share decided) | {trust['coverage']:.3f} |",
        f"| accuracy on decided images | {trust['accuracy_decided']:.3f} |",
        f"| unsure rate (all / reals) | {trust['unsure_rate']:.3f} / {trust['unsure_real']:.3f} |",
        f"| unsure because a view flips / band only | {trust['flip_rate']:.3f} / {trust['band_only_rate']:.3f} |",
        f"| score from cache, ms per image (median of {a.repeats}) | {ms_plain:.1f} |",
        f"| score --stability, ms per image (median of {a.repeats}; model load excluded) | {ms_stab:.1f} |",
        f"| model load, once per --stability run (median of {a.repeats}) | {load:.2f} s |",
        f"| **cost of --stability per image** | **{ms_stab - ms_plain:.1f} ms** ({len(views)} views: decode, "
        "perturb, embed, in memory) |", "",
        f"Clean extraction of the {len(refs)} images (before fitting, cached): {t_extract:.1f} s.", "",
        "Per class (reals, each generator): unsure rate, flip rate per view, accuracy on decided images "
        f"(also in `{os.path.basename(out)}.csv`):", "",
        "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    for rec in table:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rec.values()) + " |")
    if random_w:
        lines += ["", RANDOM_NOTE]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}.md and {out}.csv")


if __name__ == "__main__":
    main()
