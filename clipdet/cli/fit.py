"""`clipdet fit`: fit a few-shot detector from the cache."""

from __future__ import annotations

from typing import List, Optional

import typer

from .common import EXIT_OK, EXIT_PARTIAL, app, err, quiet_warnings, run_command
from .options import BackboneOpt, CacheOpt, CaptionsOpt, ManifestOpt, QuietOpt


@app.command()
def fit(
    paths: List[str] = typer.Argument(None, help="Reference images (folders/files/-); default: every labelled "
                                      "image in the cache for the backbone"),
    head: str = typer.Option("svm", "--head", help="Head name (see clipdet heads), or auto: choose head, "
                             "blocks and pruning by cross-validation on the references"),
    shots: str = typer.Option("10", "--shots", "-k", help="References per class (or per generator), or 'all'"),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing the shots and for the head"),
    out: str = typer.Option("detector.clipdet", "--out", "-o", help="Detector file to write"),
    backbone: Optional[str] = BackboneOpt,
    cache: Optional[str] = CacheOpt,
    manifest: Optional[str] = ManifestOpt,
    view: str = typer.Option("clean", "--view", help="Cached view to fit on"),
    augment_views: bool = typer.Option(False, "--augment-views", help="Add the cached perturbed views of the "
                                       "same shots as extra training rows"),
    per_generator: bool = typer.Option(False, "--per-generator", help="Draw K fakes per generator "
                                       "(and K x generators reals)"),
    exclude_generator: List[str] = typer.Option(None, "--exclude-generator", help="Hold this generator out "
                                                "(repeatable)"),
    param: List[str] = typer.Option(None, "--param", "-p", help="Head parameter key=value (repeatable)"),
    calibrate: List[str] = typer.Option(None, "--calibrate", help="Held-out labelled images for threshold and "
                                        "probabilities (default: cross-validation on the references)"),
    target_fpr: float = typer.Option(0.05, "--target-fpr", help="False-positive rate on real images the "
                                     "threshold aims at"),
    attribute: bool = typer.Option(True, "--attribute/--no-attribute", help="Also fit generator attribution "
                                   "when references name >= 2 generators"),
    device: str = typer.Option("auto", "--device", help="For extracting images not yet cached"),
    quiet: bool = QuietOpt,
    prune: int = typer.Option(0, "--prune", min=0, help="Remove the K embedding components whose removal most "
                              "improves leave-one-generator-out AUC on the references (greedy; 0: off)"),
    prune_basis: str = typer.Option("coord", "--prune-basis", help="Components --prune removes: coord "
                                    "(coordinates) or pca (principal directions of the references)"),
    features: str = typer.Option("image", "--features", help="What the head sees: image, image+text (image and "
                                 "caption embeddings) or residual (image minus its caption's direction); "
                                 "the last two need captions"),
    captions: Optional[str] = CaptionsOpt,
    unsure_accuracy: float = typer.Option(0.9, "--unsure-accuracy", help="Accuracy each side of the threshold "
                                          "must reach on the references' cross-validated scores; the scores "
                                          "between are the detector's unsure band (score --stability)"),
    threshold_rule: str = typer.Option("auto", "--threshold-rule", help="auto: with fewer real references than "
                                       "1/--target-fpr, the threshold is also kept above the normal prediction "
                                       "bound of their scores; empirical: the order statistic only"),
    tiles: str = typer.Option("", "--tiles", help="Also calibrate for scoring on SIZE:COUNT native-resolution "
                              "tiles (e.g. 224:4): the references' tiles are embedded, the tile rule and an "
                              "image-level threshold are learned on them; score then uses the tiles"),
    tile_rule: str = typer.Option("auto", "--tile-rule", help="With --tiles: auto (learned on the references), "
                                  "mean, max or mix:W"),
    blocks: str = typer.Option("", "--blocks", help="Read stored blocks instead of the final embedding: "
                               "POOL:BLOCKS, POOL cls|mean|both, BLOCKS all|middle|6|4-8|3,6,9 "
                               "(needs features extracted with --layers)"),
) -> None:
    """Fit a few-shot detector from cached features (images not yet cached are extracted first).

    --head zeroshot --shots 0 needs no references (prompts only; uncalibrated)."""
    quiet_warnings(quiet)

    def go():
        from ..fit import FitConfig, parse_params
        from ..fit import fit as run_fit

        config = FitConfig(head=head, params=parse_params(param or []), shots=shots, seed=seed, view=view,
                           augment_views=augment_views, per_generator=per_generator,
                           exclude_generators=tuple(exclude_generator or ()), calibrate=tuple(calibrate or ()),
                           target_fpr=target_fpr, attribute=attribute, prune=prune, prune_basis=prune_basis,
                           features=features, unsure_accuracy=unsure_accuracy, blocks=blocks,
                           threshold_rule=threshold_rule, tiles=tiles, tile_rule=tile_rule)
        det = run_fit(paths or None, config, backbone=backbone, cache=cache, manifest=manifest, device=device,
                      quiet=quiet, captions=captions)
        det.save(out)
        for path, reason in getattr(det, "skipped", []):
            err(f"skipped {path}: {reason}")
        for note in det.meta.get("notes", []) + getattr(det, "input_notes", []):
            err(f"note: {note}")
        if det.meta.get("auto"):
            from ..fit.auto import describe_meta

            for line in describe_meta(det.meta["auto"]):
                typer.echo(line)
        typer.echo(f"wrote {out}: {det.summary()}")
        if det.meta.get("tiles"):
            from ..fit.tiles import describe

            typer.echo(describe(det.meta["tiles"]))
        if not det.meta.get("uncalibrated") and det.meta.get("calibration", {}).get("method") != "none":
            typer.echo(det.describe_unsure())
        for line in det.explain():
            typer.echo(line)
        return det

    det = run_command(go)
    raise typer.Exit(EXIT_PARTIAL if getattr(det, "skipped", []) else EXIT_OK)
