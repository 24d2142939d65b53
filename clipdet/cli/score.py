"""`clipdet score` and `clipdet eval`: score images with a detector, evaluate on labelled ones."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer

from .common import EXIT_OK, EXIT_PARTIAL, READONLY_HINT, app, err, quiet_warnings, run_command
from .inputs import captions_for, discovery_summary, engine_option, input_refs
from .options import CacheOpt, CaptionsOpt, EngineOpt, ManifestOpt, PrecisionOpt, QuietOpt, RayAddressOpt


@app.command()
def score(
    paths: List[str] = typer.Argument(None, help="Folders (recursive), image files, or - for paths on stdin"),
    detector: str = typer.Option(..., "--detector", "-d", help="Detector file from clipdet fit"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="FILE.csv, FILE.jsonl, or - for CSV on stdout"),
    cache: Optional[str] = CacheOpt,
    cache_readonly: bool = typer.Option(False, "--cache-readonly", help="Never write to the cache: uncached "
                                        "images are embedded in memory (automatic when the cache is not writable)"),
    manifest: Optional[str] = ManifestOpt,
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold on the score "
                                              "[default: the detector's calibrated one]"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Override the detector's backbone "
                                           "spec (e.g. weights moved); must be the same weights "
                                           "[default: the detector's]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass "
                                             "[default: 32 on CPU, 256 on CUDA]"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding threads [default: by device]"),
    precision: str = PrecisionOpt,
    quiet: bool = QuietOpt,
    verdict_out: bool = typer.Option(False, "--verdict", help="Print a readable verdict per image on stdout "
                                     "(the default for a single FILE argument; otherwise CSV rows)"),
    captions: Optional[str] = CaptionsOpt,
    engine: str = EngineOpt,
    ray_address: Optional[str] = RayAddressOpt,
    stability: bool = typer.Option(False, "--stability", help="Also score each image on perturbed views "
                                   "(embedded in memory) and apply the detector's unsure band: rows gain stable, "
                                   "score_min, score_max, flips, unsure_reason; label 'unsure' when the verdict "
                                   "is not the same on every view or the score is in the band"),
    stability_views: Optional[str] = typer.Option(None, "--stability-views", help="Views for --stability "
                                                  "[default: jpeg:75,resize:0.5,crop:224]; 'none': the unsure "
                                                  "band only"),
    stability_cache: bool = typer.Option(False, "--stability-cache", help="Keep the perturbed views' features "
                                         "in --cache (default: computed in memory, never written)"),
    provenance: bool = typer.Option(True, "--provenance/--no-provenance", help="Read provenance marks (C2PA, "
                                    "XMP DigitalSourceType, generator PNG text, EXIF Software) into the "
                                    "provenance column; never part of the score"),
    tiles: Optional[str] = typer.Option(None, "--tiles", help="Score on SIZE:COUNT native-resolution tiles "
                                        "(views tile:SIZE:0..COUNT-1, no resize) and aggregate, e.g. 224:4; "
                                        "default: the detector's tiles if fitted with --tiles; none: whole images"),
    tile_rule: Optional[str] = typer.Option(None, "--tile-rule", help="How tile scores make the image's: mean, "
                                            "max or mix:W ((1-W) mean + W max); default: the rule the "
                                            "detector learned with fit --tiles, else mean"),
) -> None:
    """Score images: one row per input (path, sha256, score, p_fake, label, generator, nearest, error, provenance)."""
    quiet_warnings(quiet)
    state = {"errors": 0, "uncaptioned": 0, "flipped": 0}

    def go():
        from ..cache import FeatureCache
        from ..detectors.detector import Detector
        from ..errors import UsageError
        from ..score.output import COLUMNS, RowWriter, summarise, verdict
        from ..score.stability import STABILITY_COLUMNS
        from ..score.stability import stability_views as parse_stability
        from ..score.stream import score_refs
        from ..text import MISSING_CAPTION

        det = Detector.load(detector)
        refs = input_refs(paths or [], manifest)
        caps = captions_for(det, refs, captions, "score")
        t = det.threshold if threshold is None else threshold
        # The format follows the options, never the number of images found: verdicts for one FILE
        # argument or --verdict, else CSV/JSONL rows (on stdout without --out).
        one_file = len(paths or []) == 1 and not manifest and paths[0] != "-" and not os.path.isdir(paths[0])
        verdicts = (verdict_out or one_file) and out != "-"
        dest = out if (out or verdicts) else "-"
        if (stability_cache or stability_views is not None) and not stability:
            raise UsageError("--stability-views and --stability-cache go with --stability: give --stability too")
        if stability_cache and cache_readonly:
            raise UsageError("--stability-cache writes to the cache: drop --cache-readonly")
        stab = parse_stability(stability_views, det.view) if stability else None
        if stab is not None and det.unsure_range() is None:
            err("note: " + det.describe_unsure() + "; only view flips make a verdict unsure")
        from ..score.tiles import TILE_COLUMNS, score_tiles, tile_setting

        tiled = tile_setting(det, tiles, tile_rule)
        writer = RowWriter(dest, COLUMNS + (STABILITY_COLUMNS if stability else []) + (TILE_COLUMNS if tiled else []))
        counts: dict[str, int] = {}
        n = 0
        try:
            fc = FeatureCache(cache, readonly=cache_readonly)
            kw = dict(cache=fc, device=device, threshold=threshold, backbone=backbone, batch_size=batch_size,
                      workers=workers, quiet=quiet, precision=precision, captions=caps,
                      engine=engine_option(engine, ray_address), ray_address=ray_address)
            if tiled:
                size, count, weight, cal = tiled
                if stab is not None:
                    raise UsageError("--tiles and --stability cannot be combined yet: score tiles or check stability")
                if cal is None:
                    err(f"note: this detector has no calibration for {size}:{count} tiles: the whole-image threshold "
                        "applies to the tile rule's scores and flags more real images (fit --tiles "
                        f"{size}:{count} calibrates one)")
                elif tiles is None:
                    err(f"note: scoring on the detector's tiles {size}:{count} (rule {cal.rule}); --tiles none "
                        "scores whole images")
                from ..detectors.tiles import tile_decision

                t = tile_decision(det, cal, threshold)[0]
                rows = score_tiles(refs, det, size, count, weight, calibration=cal, **kw)
            else:
                rows = score_refs(refs, det, on_chunk=writer.flush, stability=stab, stability_cache=stability_cache,
                                  provenance=provenance, **kw)
            for row in rows:
                writer.write(row)
                n += 1
                counts[row["label"]] = counts.get(row["label"], 0) + 1
                state["flipped"] += bool(row.get("flips"))
                if row["error"]:
                    state["errors"] += 1
                    state["uncaptioned"] += row["error"] == MISSING_CAPTION
                    if not verdicts:
                        err(f"skipped {row['path']}: {row['error']}")
                if verdicts:
                    typer.echo(verdict(row, t))
            writer.finish()
        finally:
            writer.close()
        if not one_file or not verdicts:
            line = summarise(counts, state["errors"], n, state["uncaptioned"]) + (
                f"; {state['flipped']} change verdict under {','.join(stab) or 'no view'}" if stab is not None
                else "") + (f"; rows in {dest}" if dest and dest != "-" else "")
            (err if dest == "-" or verdicts else typer.echo)(line)
        discovery_summary(refs)

    run_command(go, cache_hint=READONLY_HINT)
    raise typer.Exit(EXIT_PARTIAL if state["errors"] else EXIT_OK)


@app.command("eval")
def eval_cmd(
    paths: List[str] = typer.Argument(None, help="Labelled images (layout real/**, fake/<generator>/**) or -"),
    detector: str = typer.Option(..., "--detector", "-d", help="Detector file from clipdet fit"),
    cache: Optional[str] = CacheOpt,
    manifest: Optional[str] = ManifestOpt,
    report: Optional[str] = typer.Option(None, "--report", help="Write a Markdown report with PNG plots here"),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object"),
    views: Optional[str] = typer.Option(None, "--views", help="Also measure AUC on these perturbed views "
                                        "(e.g. jpeg:95,jpeg:75,jpeg:50,resize:0.5,blur:1.0,crop:224)"),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Keep evaluation images that are "
                                       "detector references (metrics become optimistic)"),
    exclude_references: bool = typer.Option(False, "--exclude-references", help="Drop evaluation images that "
                                            "are detector references"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    quiet: bool = QuietOpt,
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Override the detector's backbone "
                                           "spec (e.g. weights moved); must be the same weights "
                                           "[default: the detector's]"),
    captions: Optional[str] = CaptionsOpt,
    stability: bool = typer.Option(False, "--stability", help="Score as score --stability does (labels unread) "
                                   "and report coverage, accuracy on decided images, unsure rates"),
    stability_views: Optional[str] = typer.Option(None, "--stability-views", help="Views for --stability "
                                                  "[default: jpeg:75,resize:0.5,crop:224]; 'none': the band only"),
    tiles: Optional[str] = typer.Option(None, "--tiles", help="Evaluate on SIZE:COUNT native-resolution tiles, as "
                                        "score --tiles; default: the detector's tiles if fitted with --tiles; "
                                        "none: whole images"),
    tile_rule: Optional[str] = typer.Option(None, "--tile-rule", help="mean, max or mix:W; default: the "
                                            "detector's learned rule, else mean"),
) -> None:
    """Measure a detector on labelled images: AUC, AP, accuracy, TPR@1%FPR, EER, ECE, Brier, per generator."""
    quiet_warnings(quiet)

    def go():
        from ..detectors.detector import Detector
        from ..evaluate.run import evaluate, json_safe, public, write_report
        from ..extract.views import parse_views

        det = Detector.load(detector)
        if report:
            from ..evaluate.report import prepare_output_dir

            prepare_output_dir(report, "--report")  # before scoring, not after
        refs = input_refs(paths or [], manifest)
        extra = parse_views(views)[1:] if views else []
        if stability_views is not None and not stability:
            from ..errors import UsageError

            raise UsageError("--stability-views goes with --stability: give --stability too")
        from ..score.stability import stability_views as parse_stability

        stab = parse_stability(stability_views, det.view) if stability else None
        res = evaluate(refs, det, cache=cache, views=extra, allow_overlap=allow_overlap,
                       exclude_references=exclude_references, device=device, quiet=quiet, backbone=backbone,
                       captions=captions_for(det, refs, captions, "eval"), stability=stab,
                       tiles=tiles, tile_rule=tile_rule)
        if json_out:
            typer.echo(json.dumps(json_safe(public(res)), indent=1, allow_nan=False))
        else:
            m = res["metrics"]
            if res["detector"].get("backbone_weights") == "random":
                from ..evaluate.report import RANDOM_WEIGHTS_WARNING

                typer.echo(RANDOM_WEIGHTS_WARNING.replace("**", ""))
            typer.echo(f"{m['n']} images ({m['n_real']} real, {m['n_fake']} fake): AUC {m['auc']:.3f}, "
                       f"AP {m['ap']:.3f}, acc {m['accuracy']:.3f}, bal.acc {m['balanced_accuracy']:.3f}, "
                       f"TPR@1%FPR {m['tpr_at_1pct_fpr']:.3f}, EER {m['eer']:.3f}, ECE {m['ece']:.3f}, "
                       f"Brier {m['brier']:.3f}")
            for g, a in res["per_generator_auc"].items():
                typer.echo(f"  {g:24s} AUC {a:.3f}")
            for v, r in res.get("robustness", {}).items():
                typer.echo(f"  view {v:19s} AUC {r['auc']:.3f}")
            if "trust" in res:
                t = res["trust"]
                typer.echo(f"stability ({','.join(stab) or 'band only'}): coverage {t['coverage']:.3f}, accuracy on "
                           f"decided {t['accuracy_decided']:.3f}, unsure {t['unsure_rate']:.3f} (reals "
                           f"{t['unsure_real']:.3f}; flips {t['flip_rate']:.3f}, band only {t['band_only_rate']:.3f})")
                for g, u in t["unsure_per_generator"].items():
                    typer.echo(f"  {g:24s} unsure {u:.3f}")
            pv = res["provenance"]
            typer.echo(f"provenance marks (not in any metric): real {pv['real']['marked']}/{pv['real']['n']}, "
                       f"fake {pv['fake']['marked']}/{pv['fake']['n']}")
            for n in res["notes"]:
                typer.echo(f"note: {n}")
        discovery_summary(refs)
        if report:
            path = write_report(res, report)
            if not json_out:
                typer.echo(f"report: {path}")
        return res

    res = run_command(go)
    raise typer.Exit(EXIT_PARTIAL if res["n_errors"] else EXIT_OK)


# ---------------------------------------------------------------------------------------------- serve
