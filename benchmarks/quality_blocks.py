"""Detection quality of block features and `--head auto` (issue #24): LOGO and k-shot, per generator, calibration.

    python benchmarks/quality_blocks.py --backbone onnx:/work/wt/models/dinov2s.onnx --cache /tmp/hq-dino.h5 \\
        --manifest /work/shared/data/aigi-dev/manifest.csv --layers 0,1,2,3,4,5,6,7,8,9,10,11 \\
        --out benchmarks/results/quality_blocks-dinov2s

Extracts what the cache lacks (clean view, the --layers blocks: CLS tokens and patch-token means), then
compares settings, every one fitted on references only and scored on held-out images:

- ``logo``: leave-one-generator-out at K shots per class (references drawn from the reals and the other
  generators' fakes; test = the reals not drawn + every fake of the held-out generator), for the main
  settings (final-embedding SVM = the seed paper's setting, middle blocks, --head auto) at every K;
- ``blocks``: the same at K=10 for the SVM on each single block (CLS token, patch mean);
- ``kshot``: K shots per class drawn from everything, tested on the rest.
Each row has AUC, AP, the FPR/TPR at the reference-calibrated threshold (target --target-fpr) and the
ECE of p_fake. Writes rows.csv, summary.md (means ± 95% half-widths over seeds / generators) and run.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np

MAIN = ("svm|", "svm|cls:middle", "svm|mean:middle", "svm|both:middle", "logreg|mean:middle", "auto|")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="Backbone spec (onnx:PATH, ARCH:WEIGHTS, clipdet-tiny:random)")
    p.add_argument("--cache", required=True, help="Feature cache (outside the repo)")
    p.add_argument("--manifest", help="Labelled manifest CSV to extract first (else: the cache's labelled images)")
    p.add_argument("--data", nargs="*", default=[], help="Labelled folders to extract first")
    p.add_argument("--layers", default="", help="Blocks to extract, e.g. 0,1,...,11")
    p.add_argument("--out", required=True, help="Results folder")
    p.add_argument("--ks", default="5,10,20,50", help="Shots per class, kshot [default: %(default)s]")
    p.add_argument("--seeds", type=int, default=10, help="Seeds for kshot [default: %(default)s]")
    p.add_argument("--logo-ks", default="5,10,20,50", help="Shots per class, logo [default: %(default)s]")
    p.add_argument("--logo-seeds", type=int, default=10, help="Seeds for logo [default: %(default)s]")
    p.add_argument("--merge", nargs="*", default=None, help="Only summarise the rows.csv of these result folders "
                   "into --out (several runs of this script; a later folder's rows replace an earlier one's for "
                   "the same protocol, setting and K)")
    p.add_argument("--block-seeds", type=int, default=3, help="Seeds for the per-block sweep [default: %(default)s]")
    p.add_argument("--settings", default=",".join(MAIN), help="HEAD|BLOCKS settings [default: %(default)s]")
    p.add_argument("--protocols", default="logo,blocks,kshot", help="Which protocols [default: %(default)s]")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def load(args):
    """The labelled pool of the cache's clean features (embedding, block CLS tokens and patch means)."""
    import clipdet
    from clipdet.cache import FeatureCache
    from clipdet.extract.discover import discover
    from clipdet.fit.pools import load_pool, resolve_backbone_key

    cache = FeatureCache(args.cache)
    if args.manifest or args.data:
        refs = discover(list(args.data), manifest=args.manifest)
        layers = [int(x) for x in args.layers.split(",") if x.strip()] or None
        t = time.time()
        s = clipdet.extract(refs, args.backbone, cache=cache, layers=layers, device=args.device, quiet=True)
        print(f"extract: {s.new} new, {s.cached} cached in {time.time() - t:.0f} s", file=sys.stderr)
    key, _ = resolve_backbone_key(cache, args.backbone, "clean")
    g = cache.group(key, "clean")
    kinds = ["embedding"] + (["layers"] if g.layers else []) + (["layers_mean"] if "layers_mean" in g.extras else [])
    return load_pool(cache, key, "clean", kinds=kinds)


def fit(train, setting: str, seed: int, target_fpr: float):
    """A detector for `setting` ("HEAD|BLOCKS" or "HEAD|BLOCKS|THRESHOLD_RULE") on the `train` pool,
    calibrated on the references."""
    from clipdet.fit.config import FitConfig
    from clipdet.fit.head import fit_from_pool

    head, blocks, rule = (setting.split("|") + ["", ""])[:3]
    return fit_from_pool(train, FitConfig(head=head, blocks=blocks, seed=seed, target_fpr=target_fpr,
                                          threshold_rule=rule or "auto"), attribute=False)


def score(det, test) -> dict:
    """AUC, AP, FPR/TPR at the detector's threshold and ECE of p_fake on `test`."""
    from clipdet.evaluate.common import decide
    from clipdet.evaluate.metrics import average_precision, ece, roc_auc

    y = test.y
    s = decide(det, test)
    flagged = s >= det.threshold
    return {"auc": roc_auc(y, s), "ap": average_precision(y, s), "fpr": float(flagged[y == 0].mean()),
            "tpr": float(flagged[y == 1].mean()), "ece": ece(y, det.proba_from_scores(s)),
            "n_test_real": int((y == 0).sum()), "n_test_fake": int((y == 1).sum())}


def logo_plans(pool, k: int, seeds):
    """(generator, seed, train idx, test idx) for leave-one-generator-out at `k` shots per class."""
    from clipdet.fit.shots import sample_shots

    lab, gen = pool.label, pool.generator
    named = sorted({g for g, t in zip(gen, lab) if t == "fake" and g})
    reals = [i for i in range(len(pool)) if lab[i] == "real"]
    for g in named:
        held = [i for i in range(len(pool)) if lab[i] == "fake" and gen[i] == g]
        cand = sorted(reals + [i for i in range(len(pool)) if lab[i] == "fake" and gen[i] != g])
        for seed in seeds:
            sub = sample_shots([lab[i] for i in cand], [gen[i] for i in cand], k, seed,
                               keys=[pool.sha256[i] for i in cand])
            train = [cand[j] for j in sub]
            shas = {pool.sha256[i] for i in train}
            test = [i for i in reals if pool.sha256[i] not in shas] + [i for i in held if pool.sha256[i] not in shas]
            yield g, seed, train, test


def kshot_plans(pool, k: int, seeds):
    """(None, seed, train idx, test idx): `k` shots per class from everything, tested on the rest."""
    from clipdet.evaluate.common import split_references

    for seed in seeds:
        train, test = split_references(pool, k, seed)
        yield "", seed, train, test


def run(pool, args) -> list[dict]:
    """Every protocol's rows."""
    ks = [int(k) for k in args.ks.split(",") if k]
    logo_ks = [int(k) for k in args.logo_ks.split(",") if k]
    seeds, logo_seeds = list(range(args.seeds)), list(range(args.logo_seeds))
    settings = [s for s in args.settings.split(",") if s]
    protos = set(args.protocols.split(","))
    blocks = sorted(int(b) for b in pool.feats["layers"][1]["blocks"]) if "layers" in pool.feats else []
    pools = [p for p, kd in (("cls", "layers"), ("mean", "layers_mean")) if kd in pool.feats]
    jobs = []
    if "logo" in protos:
        jobs += [("logo", k, s, logo_plans(pool, k, logo_seeds)) for k in logo_ks for s in settings]
    if "kshot" in protos:
        jobs += [("kshot", k, s, kshot_plans(pool, k, seeds)) for k in ks for s in settings]
    if "blocks" in protos:
        jobs += [("blocks", 10, f"svm|{p}:{b}", logo_plans(pool, 10, range(args.block_seeds)))
                 for b in blocks for p in pools]
    rows = []
    for proto, k, setting, plans in jobs:
        t0, n = time.time(), 0
        for g, seed, train, test in plans:
            tr = pool.take(train)
            t = time.time()
            det = fit(tr, setting, seed, args.target_fpr)
            row = {"protocol": proto, "setting": setting, "k": k, "generator": g, "seed": seed,
                   "fit_s": round(time.time() - t, 3), **score(det, pool.take(test))}
            if setting.startswith("auto"):
                c = det.meta["auto"]["chosen"]
                row["chosen"] = f"{c['head']}|{c['blocks']}|prune{c['prune']}"
            rows.append(row)
            n += 1
        print(f"{proto} K={k} {setting}: {n} fits in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def _mci(v) -> tuple[float, float]:
    v = np.asarray([x for x in v if not math.isnan(x)], float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def summary(rows, target_fpr: float) -> str:
    """Markdown tables: per protocol, setting and K; per generator for LOGO at K=10."""
    out = []
    for proto in ("logo", "kshot", "blocks"):
        sel = [r for r in rows if r["protocol"] == proto]
        if not sel:
            continue
        out.append(f"\n## {proto}\n\n| setting | K | AUC | AP | FPR@thr (target {target_fpr}) | TPR@thr | ECE "
                   "| fit s |")
        out.append("|---|---|---|---|---|---|---|---|")
        for setting in dict.fromkeys(r["setting"] for r in sel):
            for k in sorted({r["k"] for r in sel}):
                rr = [r for r in sel if r["setting"] == setting and r["k"] == k]
                if not rr:
                    continue
                if proto == "kshot":  # spread over seeds
                    cells = [_mci([r[m] for r in rr]) for m in ("auc", "ap", "fpr", "tpr", "ece")]
                else:  # mean over generators of the per-generator mean over seeds; AUC, AP and TPR spread
                    # over generators; FPR and ECE over seeds (every generator's test shares one seed's reals)
                    gens = sorted({r["generator"] for r in rr})
                    seeds = sorted({r["seed"] for r in rr})
                    cells = [_mci([np.nanmean([r[m] for r in rr if r["generator"] == g]) for g in gens])
                             if m in ("auc", "ap", "tpr") else
                             _mci([np.nanmean([r[m] for r in rr if r["seed"] == s]) for s in seeds])
                             for m in ("auc", "ap", "fpr", "tpr", "ece")]
                fs = np.mean([r["fit_s"] for r in rr])
                out.append(f"| {setting} | {k} | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in cells)
                           + f" | {fs:.2f} |")
    logo = [r for r in rows if r["protocol"] == "logo" and r["k"] == 10]
    if logo:
        settings = list(dict.fromkeys(r["setting"] for r in logo))
        out.append("\n## logo K=10 per generator (AUC, mean over seeds)\n")
        out.append("| generator | " + " | ".join(settings) + " |")
        out.append("|---|" + "---|" * len(settings))
        for g in sorted({r["generator"] for r in logo}):
            out.append(f"| {g} | " + " | ".join(
                f"{np.nanmean([r['auc'] for r in logo if r['generator'] == g and r['setting'] == s]):.3f}"
                for s in settings) + " |")
    auto = [r for r in rows if r.get("chosen")]
    if auto:
        from collections import Counter

        for setting in dict.fromkeys(r["setting"] for r in auto):
            out.append(f"\n## what {setting.rstrip('|')} chose (all its fits)\n")
            for c, n in Counter(r["chosen"] for r in auto if r["setting"] == setting).most_common(12):
                out.append(f"- {c}: {n}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """Run and write rows.csv, summary.md, run.json into --out."""
    args = parse_args(argv)
    t0 = time.time()
    if args.merge is not None:  # a later folder's rows replace an earlier one's for the same protocol, setting, K
        merged: dict[tuple, list] = {}
        for d in args.merge:
            with open(os.path.join(d, "rows.csv")) as f:
                new = [{k: (v if k in ("protocol", "setting", "generator", "chosen") else
                            int(float(v)) if k in ("k", "seed") else
                            float(v) if v not in ("", None) else math.nan) for k, v in r.items()}
                       for r in csv.DictReader(f)]
            for r in new:
                merged.pop((r["protocol"], r["setting"], r["k"]), None)
            for r in new:
                merged.setdefault((r["protocol"], r["setting"], r["k"]), []).append(r)
        rows = [r for rr in merged.values() for r in rr]
        pool = []
    else:
        pool = load(args)
        print(f"pool: {len(pool)} images ({sum(pool.y)} fake), kinds {['embedding', *pool.feats]}", file=sys.stderr)
        rows = run(pool, args)
    os.makedirs(args.out, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    md = summary(rows, args.target_fpr)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"# quality_blocks: {args.backbone}\n\nCommand: `{shlex.join(['python', *sys.argv])}`\n" + md)
    import clipdet

    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"command": shlex.join(["python", *sys.argv]), "args": vars(args), "n_images": len(pool),
                   "clipdet_version": clipdet.__version__, "python": platform.python_version(),
                   "machine": platform.platform(), "cpus": os.cpu_count(), "seconds": round(time.time() - t0)},
                  f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
