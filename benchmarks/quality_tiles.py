"""Native-resolution tiles vs the resized whole image (issue #24): k-shot AUC and FPR at the threshold.

    python benchmarks/quality_tiles.py --backbone onnx:/work/wt/models/dinov2s.onnx --cache /tmp/hq-dino.h5 \\
        --manifest /tmp/hq-tiles.csv --tiles 224:4 --out benchmarks/results/quality_tiles-dinov2s

Extracts the tile views `tile:SIZE:0..T-1` of the manifest's images (and the clean view), then, per setting
(HEAD|BLOCKS), K and seed, draws K references per class and compares: ``clean`` (fit and score on the
image resized by the backbone), ``tiles-mean`` / ``tiles-max`` (fit on every tile of the references as
rows; score each tile of a test image and aggregate), with the detector's threshold (calibrated on
single tiles, whose folds mix tiles of one image) or, ``-imgcal``, a threshold set on the references'
aggregated out-of-fold image scores (folds of whole images). These are the earlier, hand-made comparisons.

``detector-tiles`` is what clipdet ships (`fit --tiles`, `clipdet.fit.tiles`): the head learns from the
references' whole images and tiles, the tile rule (mean / mix:W / max) and the image-level threshold are
learned on the references' out-of-fold scores, and test images are scored on their tiles with both;
``detector-whole`` is the same detector on whole images; for `auto|`, ``detector-view`` scores each test
image the way the detector's default view says (tiles or whole image, chosen on the references).
`--protocols logo` runs the detector modes leave-one-generator-out at --logo-k (the kshot protocol draws
from everything). Writes rows.csv and summary.md into --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import time

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--manifest", required=True, help="Labelled images to compare on (their tiles are extracted)")
    p.add_argument("--tiles", default="224:4", help="SIZE:COUNT [default: %(default)s]")
    p.add_argument("--ks", default="10,20")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--settings", default="svm|,svm|mean:middle")
    p.add_argument("--protocols", default="kshot", help="kshot and/or logo [default: %(default)s]")
    p.add_argument("--logo-k", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--merge", nargs="*", default=None, help="Only summarise these result folders' rows.csv into "
                   "--out (a later folder's rows replace an earlier one's for the same protocol, setting and K)")
    return p.parse_args(argv)


def detector_modes(clean, tiles, train, test, cfg, seed) -> dict:
    """{mode: (scores of the test images, threshold)} for the shipped `fit --tiles` detector, and its
    choice of rule and view."""
    from clipdet.detectors.tiles import TileCalibration, mix
    from clipdet.evaluate.common import decide
    from clipdet.fit.head import fit_from_pool

    det = fit_from_pool(clean.take(train), cfg, seed=seed, attribute=False, tiles=[p.take(train) for p in tiles])
    cal = TileCalibration.from_meta(det.meta)
    S = np.stack([decide(det, p.take(test)) for p in tiles], axis=1)
    whole = decide(det, clean.take(test))
    res = {"detector-tiles": (mix(S, cal.weight), cal.threshold), "detector-whole": (whole, det.threshold)}
    if cfg.head == "auto":
        res["detector-view"] = res["detector-tiles"] if cal.default else res["detector-whole"]
    return res, {"rule": cal.rule, "tiles_default": cal.default}


def concat(pools):
    """One pool holding the rows of `pools` (same feature kinds)."""
    from clipdet.fit.pools import Pool

    feats = {k: (np.vstack([p.feats[k][0] for p in pools]), pools[0].feats[k][1]) for k in pools[0].feats}
    return Pool(sum((p.sha256 for p in pools), []), sum((p.label for p in pools), []),
                sum((p.generator for p in pools), []), sum((p.path for p in pools), []),
                np.vstack([p.X for p in pools]), feats)


def image_oof(tiles, train, cfg, seed, n_splits: int = 5) -> np.ndarray:
    """(len(train), T) out-of-fold tile scores of the references, folds made of whole images (all the
    tiles of an image on one side), so the threshold can be set on aggregated image scores."""
    from sklearn.model_selection import StratifiedKFold

    from clipdet.evaluate.common import decide
    from clipdet.fit.head import fit_from_pool

    y = tiles[0].take(train).y
    k = int(min(n_splits, np.bincount(y, minlength=2).min()))
    out = np.zeros((len(train), len(tiles)))
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        det = fit_from_pool(concat([p.take([train[i] for i in tr]) for p in tiles]), cfg, seed=seed,
                            attribute=False, calibrate=False)
        out[te] = np.stack([decide(det, p.take([train[i] for i in te])) for p in tiles], axis=1)
    return out


def write(args, rows: list[dict], what: str) -> None:
    """rows.csv and summary.md into --out."""
    from collections import Counter

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# quality_tiles: {args.backbone}, {what}\n",
             f"Command: `{shlex.join(['python', *sys.argv])}`\n",
             "kshot: mean ± 95% half-width over seeds. logo: AUC and TPR mean over held-out generators (of the "
             "mean over seeds) ± over generators; FPR mean ± over seeds (the generators of one seed share its "
             "reals).\n",
             "| protocol | setting | K | mode | AUC | FPR@thr (target 0.05) | TPR@thr | rule chosen | tiles default |",
             "|---|---|---|---|---|---|---|---|---|"]

    def mci(v):
        v = np.asarray(v, float)
        return f"{v.mean():.3f} ± {1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float('nan'):.3f}"

    for proto in ("kshot", "logo"):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["protocol"] == proto):
            for k in sorted({r["k"] for r in rows if r["protocol"] == proto}):
                for mode in ("clean", "tiles-mean", "tiles-max", "tiles-mean-imgcal", "tiles-max-imgcal",
                             "detector-whole", "detector-tiles", "detector-view"):
                    rr = [r for r in rows if r["protocol"] == proto and r["setting"] == setting and r["k"] == k
                          and r["mode"] == mode]
                    if not rr:
                        continue
                    if proto == "kshot":
                        cells = [mci([r[m] for r in rr]) for m in ("auc", "fpr", "tpr")]
                    else:
                        gens, seeds = sorted({r["generator"] for r in rr}), sorted({r["seed"] for r in rr})
                        per_g = {m: [np.mean([r[m] for r in rr if r["generator"] == g]) for g in gens]
                                 for m in ("auc", "tpr")}
                        cells = [mci(per_g["auc"]), mci([np.mean([r["fpr"] for r in rr if r["seed"] == s])
                                                         for s in seeds]), mci(per_g["tpr"])]
                    rules = Counter(r["rule"] for r in rr).most_common(3)
                    dflt = np.mean([bool(r["tiles_default"]) for r in rr])
                    lines.append(f"| {proto} | {setting} | {k} | {mode} | " + " | ".join(cells) + " | "
                                 + ", ".join(f"{a} {b}" for a, b in rules) + f" | {dflt:.0%} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    print(md)


def main(argv=None) -> int:
    """Run and write rows.csv and summary.md."""
    args = parse_args(argv)
    if args.merge is not None:
        rows = {}
        for d in args.merge:
            with open(os.path.join(d, "rows.csv")) as f:
                new = [{k: (int(v) if k in ("k", "seed") else float(v) if k in ("auc", "fpr", "tpr") else
                            v == "True" if k == "tiles_default" else v) for k, v in r.items()}
                       for r in csv.DictReader(f)]
            for r in new:
                rows.pop((r["protocol"], r["setting"], r["k"]), None)
            for r in new:
                rows.setdefault((r["protocol"], r["setting"], r["k"]), []).append(r)
        write(args, [r for rr in rows.values() for r in rr], f"merged from {', '.join(args.merge)}")
        return 0
    import clipdet
    from clipdet.cache import FeatureCache
    from clipdet.detectors.calibration import threshold_at_fpr
    from clipdet.evaluate.common import decide, split_references
    from clipdet.evaluate.metrics import roc_auc
    from clipdet.extract.discover import discover
    from clipdet.extract.views import tile_views
    from clipdet.fit.config import FitConfig
    from clipdet.fit.head import fit_from_pool
    from clipdet.fit.pools import load_pool, resolve_backbone_key
    from clipdet.score.tiles import aggregate, parse_tiles

    size, count = parse_tiles(args.tiles)
    views = tile_views(size, count)
    cache = FeatureCache(args.cache)
    refs = discover([], manifest=args.manifest)
    t = time.time()
    s = clipdet.extract(refs, args.backbone, cache=cache, views=views, quiet=True)
    print(f"extract: {s.new} new, {s.cached} cached in {time.time() - t:.0f} s", file=sys.stderr)
    shas = sorted({sha for _, sha, err in s.records if not err})
    key, _ = resolve_backbone_key(cache, args.backbone, "clean")
    kinds = ["embedding", "layers", "layers_mean"]
    clean = load_pool(cache, key, "clean", shas=shas, kinds=kinds)
    labels = {sh: (lab, g) for sh, lab, g in zip(clean.sha256, clean.label, clean.generator)}
    tiles = []
    for v in views:
        p = load_pool(cache, key, v, shas=clean.sha256, labels=labels, kinds=kinds)
        if p.sha256 != clean.sha256:
            sys.exit(f"{args.cache}: the {v} rows differ from the clean view's (extraction errors?)")
        tiles.append(p)
    rows = []
    protos = args.protocols.split(",")
    for setting in args.settings.split(",") if "logo" in protos else []:
        head, _, blocks = setting.partition("|")
        cfg = FitConfig(head=head, blocks=blocks, tiles=args.tiles)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from quality_blocks import logo_plans

        for g, seed, train, test in logo_plans(clean, args.logo_k, range(args.seeds)):
            y = clean.take(test).y
            res, info = detector_modes(clean, tiles, train, test, cfg, seed)
            for name, (scores, thr) in res.items():
                flagged = scores >= thr
                rows.append({"protocol": "logo", "setting": setting, "mode": name, "k": args.logo_k, "seed": seed,
                             "generator": g, "auc": roc_auc(y, scores), "fpr": float(flagged[y == 0].mean()),
                             "tpr": float(flagged[y == 1].mean()), **info})
        print(f"{setting} logo K={args.logo_k} done", file=sys.stderr, flush=True)
    for setting in args.settings.split(",") if "kshot" in protos else []:
        head, _, blocks = setting.partition("|")
        cfg = FitConfig(head=head, blocks=blocks, tiles=args.tiles)
        for k in [int(x) for x in args.ks.split(",")]:
            for seed in range(args.seeds):
                train, test = split_references(clean, k, seed)
                y = clean.take(test).y
                res, info = detector_modes(clean, tiles, train, test, cfg, seed)
                cfg1 = cfg.replace(tiles="")
                det = fit_from_pool(clean.take(train), cfg1, seed=seed, attribute=False)
                sc = decide(det, clean.take(test))
                res["clean"] = (sc, det.threshold)
                if head == "auto":  # the hand-made comparisons below are for fixed settings
                    res.pop("clean")
                    for name, (scores, thr) in res.items():
                        flagged = scores >= thr
                        rows.append({"protocol": "kshot", "setting": setting, "mode": name, "k": k, "seed": seed,
                                     "generator": "", "auc": roc_auc(y, scores), "fpr": float(flagged[y == 0].mean()),
                                     "tpr": float(flagged[y == 1].mean()), **info})
                    continue
                tdet = fit_from_pool(concat([p.take(train) for p in tiles]), cfg1, seed=seed, attribute=False)
                S = np.stack([decide(tdet, p.take(test)) for p in tiles], axis=1)
                oof = image_oof(tiles, train, cfg1, seed)  # per-image out-of-fold tile scores of the references
                yr = clean.take(train).y
                for rule in ("mean", "max"):
                    res[f"tiles-{rule}"] = (aggregate(S, rule), tdet.threshold)
                    thr = threshold_at_fpr(aggregate(oof, rule)[yr == 0], cfg.target_fpr)
                    res[f"tiles-{rule}-imgcal"] = (aggregate(S, rule), thr)
                for name, (scores, thr) in res.items():
                    flagged = scores >= thr
                    rows.append({"protocol": "kshot", "setting": setting, "mode": name, "k": k, "seed": seed,
                                 "generator": "", "auc": roc_auc(y, scores), "fpr": float(flagged[y == 0].mean()),
                                 "tpr": float(flagged[y == 1].mean()), **info})
            print(f"{setting} K={k} done", file=sys.stderr, flush=True)
    write(args, rows, f"{len(clean)} images, tiles {size} px x {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
