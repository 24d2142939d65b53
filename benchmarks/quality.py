"""Detection-quality benchmark: k-shot curves, leave-one-generator-out and robustness on a labelled folder.

    python benchmarks/quality.py --data ../shared/data/aigi-dev --backbone ViT-B-32:random \\
        --out benchmarks/results/quality-vitb32-random

Extracts what the feature cache lacks (clean + the robustness views; the cache lives outside the repo,
by default in the temp folder), runs `clipdet.evaluate.bench.run_bench` and writes into --out: the per-fit
CSVs (kshot.csv, logo.csv, robustness.csv), summaries, run.json (config, data manifest hash, versions,
machine, command), report.md with plots, and README.md with the headline numbers.

Random weights (ARCH:random) measure the pipeline, not detection: their numbers mean nothing about how
well CLIP features detect generated images. The papers' numbers need pretrained weights
(ViT-L-14:openai), which this machine cannot download; pass them as ARCH:/path/to/weights elsewhere.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time

DEFAULT_HEADS = "svm,logreg,knn,centroid"
DEFAULT_VIEWS = "jpeg:95,jpeg:75,resize:0.5"

RANDOM_WARNING = (
    "**These numbers come from RANDOM weights and say nothing about detection quality.** A randomly "
    "initialised backbone has learned nothing; any AUC above 0.5 here comes from low-level image "
    "statistics (size, compression, colour) that random patch projections happen to keep, i.e. from "
    "dataset shortcuts, not from what CLIP-based detectors rely on. The papers' numbers need pretrained "
    "weights (`ViT-L-14:openai`), which cannot be downloaded on this machine: run this script elsewhere "
    "with `--backbone ViT-L-14:openai` (or `ViT-L-14-quickgelu:/path/to/weights`) for meaningful numbers. "
    "What these runs do show: the protocols run end to end, how long they take, and how the bench reports."
)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Labelled folder: real/<source>/..., fake/<generator>/...")
    p.add_argument("--backbone", required=True, help="Backbone spec, e.g. ViT-B-32:random or ViT-L-14:openai")
    p.add_argument("--out", required=True, help="Results folder, e.g. benchmarks/results/quality-vitb32-random")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipdet-bench-cache.h5"),
                   help="Feature cache (keep it outside the repo) [default: %(default)s]")
    p.add_argument("--heads", default=DEFAULT_HEADS, help="Heads [default: %(default)s]")
    p.add_argument("--ks", default="1,2,5,10,20,50,100", help="Shots per class for the k-shot curve")
    p.add_argument("--seeds", type=int, default=5, help="Seeds per setting [default: %(default)s]")
    p.add_argument("--shots", default="10", help="References per class for LOGO and robustness [default: 10]")
    p.add_argument("--views", default=DEFAULT_VIEWS, help="Robustness views [default: %(default)s]")
    p.add_argument("--protocol", default="all", help="kshot, logo, robustness or all")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--label", default=None, help="What the backbone is, for the title and notes (e.g. 'DINOv2-S, "
                   "not CLIP'); default: the spec")
    return p.parse_args(argv)


def _fmt(mean: float, half: float | None = None) -> str:
    if mean is None or mean != mean:
        return "n/a"
    return f"{mean:.3f}" if half is None or half != half else f"{mean:.3f} ± {half:.3f}"


def headline(res) -> str:
    """Markdown table per head: AUC at K=1/10/100, LOGO mean and worst, AUC per view, format-shortcut change."""
    from clipdet.evaluate.report import markdown_table

    s = res.summaries()
    heads = res.record["config"]["heads"]
    ks = sorted({r["k"] for r in s["kshot"]})
    show_k = [k for k in (1, 10, 100) if k in ks] or ks[:3]
    views = [r["view"] for r in s["robustness"] if r["fit_view"] == "clean" and r["head"] == heads[0]]
    rows = []
    for h in heads:
        row = {"head": h}
        for k in show_k:
            m = next((r for r in s["kshot"] if r["head"] == h and r["k"] == k), None)
            row[f"AUC K={k}"] = _fmt(m["auc_mean"], m["auc_ci95"]) if m else "n/a"
        cal_k = 10 if 10 in ks else show_k[-1]
        m = next((r for r in s["kshot"] if r["head"] == h and r["k"] == cal_k), None)
        if m and "fpr_mean" in m:
            row[f"FPR at threshold K={cal_k}"] = _fmt(m["fpr_mean"])
            row[f"ECE K={cal_k}"] = _fmt(m["ece_mean"])
        lg = [r for r in s["logo"] if r["head"] == h and not math.isnan(r["auc_mean"])]
        if lg:
            row["LOGO mean AUC"] = _fmt(sum(r["auc_mean"] for r in lg) / len(lg))
            w = min(lg, key=lambda r: r["auc_mean"])
            row["LOGO hardest"] = f"{w['generator']} {w['auc_mean']:.3f}"
        for v in views:
            m = next((r for r in s["robustness"] if r["head"] == h and r["fit_view"] == "clean" and r["view"] == v),
                     None)
            row[f"AUC {v}"] = _fmt(m["auc_mean"]) if m else "n/a"
        fs = next((r for r in res.shortcut if r["head"] == h), None)
        if fs:
            row["format Δ"] = f"{fs['delta']:+.3f}"
        rows.append(row)
    return markdown_table(rows)


def main(argv=None) -> int:
    """Run the benchmark; returns an exit code."""
    args = parse_args(argv)
    from clipdet.errors import ClipdetError
    from clipdet.evaluate.bench import parse_protocols, run_bench, write_bench
    from clipdet.evaluate.pools import load_pools
    from clipdet.extract.views import parse_views
    from clipdet.fit.config import parse_shots

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    try:
        protos = parse_protocols(args.protocol)
        views = parse_views(args.views) if "robustness" in protos else ["clean"]
        say(f"extracting {args.data} with {args.backbone}, views {','.join(views)} into {args.cache}")
        t0 = time.perf_counter()
        from clipdet.detectors import kinds_for
        from clipdet.evaluate.parse import parse_heads

        kinds = kinds_for(parse_heads(args.heads))  # e.g. the layers head reads the blocks' CLS tokens
        pools, info = load_pools([args.data], None, args.cache, args.backbone, views, args.device, quiet=True,
                                 kinds=kinds)
        t_extract = time.perf_counter() - t0
        s = info["extract"]
        say(s.line() if s is not None else f"loaded from cache in {t_extract:.1f} s")
        config = {"backbone": info["backbone"].get("spec"), "backbone_key": info["backbone_key"],
                  "backbone_record": info["backbone"], "data": os.path.abspath(args.data), "command": command,
                  "cache": os.path.abspath(args.cache), "device": args.device,
                  "extract": {"images": s.total, "new": s.new, "cached": s.cached, "skipped": len(s.errors),
                              "forward_passes": s.embedded, "seconds": round(s.seconds, 1)} if s else None}
        res = run_bench(pools, protos, args.heads, args.ks, args.seeds, parse_shots(args.shots),
                        formats=info["formats"], config=config, progress=say)
    except ClipdetError as e:
        print(f"quality.py: error: {e}", file=sys.stderr)
        return 2
    is_random = info["backbone"].get("weights") == "random"
    label = args.label or config["backbone"]
    preamble = (f"> {RANDOM_WARNING}\n\n" if is_random else "") + f"Command: `{command}`"
    files = write_bench(res, args.out, title=f"clipdet quality benchmark: {label}", preamble=preamble)
    rec = res.record
    m = rec["machine"]
    ext = config["extract"]
    ext_line = (f"Extraction: {ext['images']} files, {ext['new']} new, {ext['forward_passes']} forward passes "
                f"(images x views) in {ext['seconds']} s on `{args.device}`." if ext else "")
    def fmt_mix(label: str) -> str:
        return ", ".join(f"{r['format']} {r['fraction']:.0%}" for r in res.formats["rows"] if r["label"] == label)

    readme = [
        f"# Quality benchmark: {label} (`{config['backbone']}`) on `{os.path.basename(os.path.normpath(args.data))}`",
        "", (f"> {RANDOM_WARNING}" if is_random else
             f"> Pretrained weights ({label}): these numbers measure the detector on this data set."), "",
        "## Command", "", "```", command, "```", "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs. Versions: "
        + ", ".join(f"{k} {v}" for k, v in rec["versions"].items())
        + (f"; clipdet source commit `{rec['source']['git_commit']}`"
           + (" with uncommitted changes" if rec["source"].get("git_dirty") else "") if rec.get("source") else "")
        + ".", "",
        f"Data: {res.counts['real']} real, {res.counts['fake']} fake images from {len(res.counts['generators'])} "
        f"generators; manifest hash `{rec['manifest_hash']}`. "
        + (f"File formats: real {fmt_mix('real')}; fake {fmt_mix('fake')} (total variation "
           f"{res.formats['total_variation']:.2f}). " if res.formats else "")
        + f"{ext_line} Protocol time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()) + ".", "",
        "## Headline numbers", "",
        f"Mean over seeds {rec['config']['seeds']} (± 95% t-interval half-width). k-shot: K references per class, "
        f"tested on every other image. LOGO: {rec['config']['shots']} references per class from the other "
        "generators, tested on the held-out one (mean and hardest over generators). FPR at threshold: the share "
        "of real test images flagged at the reference-calibrated threshold (target "
        f"{rec['config'].get('target_fpr', 0.05)}); ECE: expected calibration error of p_fake (15 bins). "
        "Views: fit on clean, test on "
        "the perturbed images (real and fake alike). Format Δ: AUC change when every image is re-encoded as "
        "JPEG 95.", "",
        headline(res),
        ("Embedding shift per view (mean L2 change of an image's embedding, relative to the spread between "
         "clean embeddings): " + ", ".join(f"{r['view']} {r['relative_shift']:.3f}" for r in res.view_shift)
         + ". A shift near 0 means the perturbation barely changes the features, so its AUC cannot move.\n")
        if res.view_shift else "",
        "## Files", "",
        "- `report.md`: every table and plot; `run.json`: config, manifest hash, versions, machine, summaries",
        "- `kshot.csv`, `logo.csv`, `robustness.csv`: one row per fitted detector; `*_summary.csv`: mean ± 95%",
        "- `format_shortcut.csv`: the format-shortcut check per head", "",
    ]
    if res.notes:
        readme += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(readme))
    say(f"wrote {len(files) + 1} files to {args.out}")
    print(headline(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
