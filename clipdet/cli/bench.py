"""`clipdet bench`: k-shot curves, leave-one-generator-out and robustness from cached features.

Thin on purpose: `load_pools` extracts what the cache lacks and loads labelled pools per view; the
protocols themselves live in `clipdet.evaluate`. `register(app)` adds the command to a Typer app
(clipdet's own app calls it in cli.py).
"""

from __future__ import annotations

import shlex
import sys
from typing import List, Optional

import typer

from ..evaluate.pools import load_pools
from ..fit.config import FitConfig


def _summary_lines(res) -> list[str]:
    """A few lines: AUC at each K, LOGO mean/worst generator, AUC per view, format-shortcut change."""
    import math

    def f(x: float) -> str:
        return "n/a" if x != x else f"{x:.3f}"

    s = res.summaries()
    lines = []
    heads = res.record["config"]["heads"]
    for h in heads:
        ks = [r for r in s["kshot"] if r["head"] == h]
        if ks:
            lines.append(f"k-shot {h:8s} AUC " + "  ".join(f"K={r['k']}: {f(r['auc_mean'])}" for r in ks))
    for h in heads:
        lg = [r for r in s["logo"] if r["head"] == h and not math.isnan(r["auc_mean"])]
        if lg:
            worst = min(lg, key=lambda r: r["auc_mean"])
            mean = sum(r["auc_mean"] for r in lg) / len(lg)
            lines.append(f"logo   {h:8s} mean AUC over {len(lg)} held-out generators {f(mean)}; "
                         f"hardest {worst['generator']} {f(worst['auc_mean'])}")
    for h in heads:
        rb = [r for r in s["robustness"] if r["head"] == h and r["fit_view"] == "clean"]
        if rb:
            lines.append(f"robust {h:8s} AUC " + "  ".join(f"{r['view']}: {f(r['auc_mean'])}" for r in rb))
    for r in res.shortcut:
        lines.append(f"format {r['head']:8s} AUC clean {f(r['auc_clean'])} -> all re-encoded {r['view']} "
                     f"{f(r['auc_reencoded'])} (change {r['delta']:+.3f}): {r['verdict']}")
    return lines


def register(app: typer.Typer) -> None:
    """Add the `bench` command to `app`."""

    @app.command("bench")
    def bench(
        paths: List[str] = typer.Argument(None, help="Labelled images (layout real/**, fake/<generator>/**) or -; "
                                          "default: every labelled image cached for the backbone"),
        protocol: str = typer.Option("all", "--protocol", help="kshot, logo, robustness, a comma list, or all"),
        heads: str = typer.Option("svm,logreg", "--heads", help="Comma-separated head names (see clipdet heads)"),
        ks: str = typer.Option("1,2,5,10,20,50,100", "--ks", help="Shots per class for the k-shot curve"),
        seeds: int = typer.Option(5, "--seeds", min=1, help="Number of seeds (0..N-1) per setting"),
        shots: str = typer.Option("10", "--shots", "-k", help="References per class for logo and robustness, "
                                  "or 'all'"),
        views: str = typer.Option("jpeg:95,jpeg:75,jpeg:50,resize:0.5,blur:1.0,crop:224", "--views",
                                  help="Perturbed views for robustness (jpeg:95 doubles as the format-shortcut "
                                  "check: every image re-encoded the same way)"),
        backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="ARCH:PRETRAINED, ARCH:/path/to/"
                                               "weights or ARCH:random [default: the cache's only backbone, "
                                               "else ViT-L-14:openai]"),
        cache: Optional[str] = typer.Option(None, "--cache", "-c", help="Feature cache file [default: "
                                            "$CLIPDET_CACHE or cache/clipdet.h5]"),
        manifest: Optional[str] = typer.Option(None, "--manifest", "-m", help="CSV with columns path,label,"
                                               "generator"),
        out: str = typer.Option("bench-out", "--out", "-o", help="Folder for kshot.csv, logo.csv, robustness.csv, "
                                "run.json and report.md (created; other files in it are left alone)"),
        target_fpr: float = typer.Option(0.05, "--target-fpr", help="FPR on real images the reference-calibrated "
                                         "threshold aims at (for accuracy)"),
        per_generator: bool = typer.Option(False, "--per-generator", help="Draw K fakes per generator "
                                           "(and K x generators reals)"),
        device: str = typer.Option("auto", "--device", help="For extracting images not yet cached: auto, cpu, "
                                   "cuda or cuda:N"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or stage lines; summary only"),
        prune: int = typer.Option(0, "--prune", min=0, help="Every fit first prunes K embedding components "
                                  "(as fit --prune)"),
        prune_basis: str = typer.Option("coord", "--prune-basis", help="coord or pca (as fit --prune-basis)"),
        features: str = typer.Option("image", "--features", help="What the heads see: image, image+text or "
                                     "residual (the last two need captions: --captions or a manifest caption column)"),
        captions: Optional[str] = typer.Option(None, "--captions", help="CSV with columns sha256 or path, and "
                                               "caption (for --features image+text or residual)"),
        provenance: bool = typer.Option(True, "--provenance/--no-provenance", help="Count files carrying "
                                        "provenance marks per class (read at their recorded paths; reported "
                                        "apart, never used in a fit or AUC)"),
    ) -> None:
        """Benchmark heads on labelled images: k-shot curves over seeds, leave-one-generator-out, robustness.

        Missing features are extracted first; each fit uses seeded references, tested on the rest. Writes CSV + report.
        """
        from .common import EXIT_OK, EXIT_PARTIAL, err, quiet_warnings, run_command

        quiet_warnings(quiet)

        def go():
            from ..evaluate.bench import parse_protocols, run_bench, write_bench
            from ..evaluate.parse import parse_heads, parse_ks
            from ..evaluate.report import prepare_output_dir
            from ..extract.views import parse_views
            from ..fit.config import parse_shots

            protos = parse_protocols(protocol)
            head_list, k_list, k = parse_heads(heads), parse_ks(ks), parse_shots(shots)
            if k == 0:
                from ..errors import UsageError

                raise UsageError("--shots 0: logo and robustness need references (K = 0 is on the k-shot curve "
                                 "of zero-shot heads)")
            view_list = parse_views(views) if "robustness" in protos else ["clean"]
            prepare_output_dir(out, "--out")  # before any extraction or fit
            from ..detectors import kinds_for
            from ..fit.config import check_kinds_features
            from ..text.features import check_features

            check_features(features)  # before any extraction
            kinds = kinds_for(head_list)
            if "auto" in head_list:  # auto also considers the block features the cache holds
                from ..cache import FeatureCache
                from ..fit.run import auto_kinds

                kinds += [k for k in auto_kinds(FeatureCache(cache), backbone, "clean") if k not in kinds]
            check_kinds_features(kinds, features)
            pools, info = load_pools(list(paths or []), manifest, cache, backbone, view_list, device, quiet, kinds)
            summary = info["extract"]
            if summary is not None:
                for path, reason in summary.errors:
                    err(f"skipped {path}: {reason}")
                if not quiet:
                    err(summary.line())
            from ..fit.text import bench_text

            text, pools, text_notes = bench_text(head_list, features, captions, pools, info["refs"],
                                                 info["backbone"].get("spec") or backbone, cache,
                                                 info["backbone_key"], device)
            for note in info.get("input_notes", []) + text_notes:
                err(f"note: {note}")
            config = {"backbone": info["backbone"].get("spec"), "backbone_key": info["backbone_key"],
                      "backbone_record": info["backbone"], "paths": list(paths or []), "manifest": manifest,
                      "command": "clipdet " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "features": features}
            res = run_bench(pools, protos, head_list, k_list, seeds, k, target_fpr, per_generator,
                            formats=info["formats"], config=config, progress=None if quiet else err, text=text,
                            fit_config=FitConfig(prune=prune, prune_basis=prune_basis), provenance=provenance)
            files = write_bench(res, out)
            c = res.counts
            if info["backbone"].get("weights") == "random":
                from ..evaluate.report import RANDOM_WEIGHTS_WARNING

                typer.echo(RANDOM_WEIGHTS_WARNING.replace("**", ""))
            typer.echo(f"{c['real']} real, {c['fake']} fake images ({len(c['generators'])} generators), "
                       f"backbone {config['backbone']}, seeds 0..{seeds - 1}, "
                       f"manifest {res.record['manifest_hash'][:12]}")
            for line in _summary_lines(res):
                typer.echo(line)
            if res.provenance:
                pv = res.provenance
                typer.echo(f"provenance marks (not in any fit or AUC): real {pv['real']['marked']}/{pv['real']['n']}, "
                           f"fake {pv['fake']['marked']}/{pv['fake']['n']}")
            for note in res.notes:
                err(f"note: {note}")
            typer.echo(f"report: {files['report.md']}")
            return summary

        summary = run_command(go)
        raise typer.Exit(EXIT_PARTIAL if summary is not None and not summary.ok else EXIT_OK)
