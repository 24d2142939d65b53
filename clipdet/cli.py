"""clipdet's command line: parse options, call the library, print. No detection logic lives here.

Exit codes: 0 all done; 1 done, but some input files were skipped (unreadable or not images);
2 error (bad option, missing weights, damaged cache or detector file; one line on stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import List, Optional

import typer

from .errors import ClipdetError

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2

app = typer.Typer(
    name="clipdet",
    help="Tell AI-generated images from real photographs with frozen CLIP embeddings and few-shot heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is literal: "[default: ...]" must not be eaten as rich markup
)
cache_app = typer.Typer(help="Inspect and maintain the feature cache.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")

BackboneOpt = typer.Option(None, "--backbone", "-b", help="ARCH:PRETRAINED, ARCH:/path/to/weights or ARCH:random "
                           "[default: ViT-L-14:openai, or the only backbone in the cache]")
CacheOpt = typer.Option(None, "--cache", "-c", help="Feature cache file [default: $CLIPDET_CACHE or cache/clipdet.h5]")
ManifestOpt = typer.Option(None, "--manifest", "-m", help="CSV with columns path,label,generator")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or per-file lines; summary only")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 on CUDA and on CPUs with native bf16, else "
                            "fp32), fp32, bf16, or fp16 (CUDA)")


def _print_version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"clipdet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print clipdet's version and exit")) -> None:
    """Tell AI-generated images from real photographs with frozen CLIP embeddings and few-shot heads."""


def err(msg: str) -> None:
    """Print one line to stderr."""
    typer.echo(msg, err=True)


def _run(fn):
    """Run `fn`, turning clipdet errors into one-line messages and exit code 2."""
    try:
        return fn()
    except ClipdetError as e:
        err(f"clipdet: error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err("clipdet: interrupted (everything written so far is kept)")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # e.g. `clipdet score ... --out - | head`: the reader has what it wanted
        with contextlib.suppress(OSError, ValueError):  # the Python docs' recipe: no error at exit flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None
    except OSError as e:  # unwritable --out, disk full, a folder given as a file, ...
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        err(f"clipdet: error: {where}{e.strerror or e}")
        raise typer.Exit(EXIT_ERROR) from None
    except Exception as e:  # noqa: BLE001 - a bug or a library failure: one line, not a traceback
        err(f"clipdet: error: {type(e).__name__}: {e} (set CLIPDET_DEBUG=1 for a traceback)")
        if os.environ.get("CLIPDET_DEBUG"):
            raise
        raise typer.Exit(EXIT_ERROR) from None


def _refs(paths: List[str], manifest: Optional[str]):
    """Discover the inputs; no image at all is an error (exit 1), an input without images a warning."""
    from .errors import UsageError
    from .images import discover, require_images

    if not paths and not manifest:
        raise UsageError("give at least one PATH (folder, file or - for stdin) or --manifest CSV")
    refs = discover(paths, manifest=manifest)
    require_images(refs, paths)
    for where in refs.empty:
        err(f"clipdet: warning: no images found in {where}")
    for note in refs.notes:
        err(f"note: {note}")
    return refs


def _discovery_summary(refs) -> None:
    """At the end of a run: how many files inside the folders were not images."""
    line = refs.summary() if hasattr(refs, "summary") else ""
    if line:
        err(f"note: {line}")


def _layers(spec: Optional[str]) -> tuple[int, ...]:
    from .errors import UsageError

    if not spec:
        return ()
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--layers {spec!r}: expected comma-separated block indices like -1,-4,-8") from None


def _quiet_warnings(quiet: bool) -> None:
    import warnings

    warnings.simplefilter("default")
    warnings.formatwarning = lambda m, c, *a, **k: f"clipdet: warning: {m}\n"  # type: ignore[assignment]
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


@app.command()
def extract(
    paths: List[str] = typer.Argument(None, help="Folders (recursive), image files, or - for paths on stdin"),
    backbone: Optional[str] = BackboneOpt,
    cache: Optional[str] = CacheOpt,
    manifest: Optional[str] = ManifestOpt,
    views: Optional[str] = typer.Option(None, "--views", help="Extra perturbed views beside clean, e.g. "
                                        "jpeg:75,jpeg:50,resize:0.5,blur:1.0,crop:224"),
    layers: Optional[str] = typer.Option(None, "--layers", help="Also store the CLS token of these transformer "
                                         "blocks, e.g. -1,-4,-8"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass "
                                             "[default: 32 on CPU, 256 on CUDA]"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding threads (0: decode in the "
                                          "main thread) [default: by device]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    draft: bool = typer.Option(False, "--draft/--no-draft", help="Decode large JPEGs at reduced scale when the "
                               "model needs far fewer pixels: faster, features within cosine ~0.998 (see README)"),
    precision: str = PrecisionOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Embed images into the feature cache (content-addressed: re-runs only embed what is new)."""
    _quiet_warnings(quiet)

    def go():
        from .backbones import DEFAULT_BACKBONE
        from .extract import extract as run_extract

        refs = _refs(paths or [], manifest)
        s = run_extract(refs, backbone or DEFAULT_BACKBONE, cache=cache, views=views, batch_size=batch_size,
                        workers=workers, device=device, layers=_layers(layers) or None, quiet=quiet, draft=draft,
                        precision=precision)
        for path, reason in s.errors:
            err(f"skipped {path}: {reason}")
        typer.echo(s.line())
        _discovery_summary(refs)
        return s

    s = _run(go)
    raise typer.Exit(EXIT_OK if s.ok else EXIT_PARTIAL)


@app.command()
def backbones(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """List known backbone architectures and their pretrained tags (open_clip's, plus built-in test configs)."""

    def go():
        from .backbones import list_backbones

        items = list_backbones()
        if json_out:
            typer.echo(json.dumps({a: t for a, t in items}, indent=1))
            return
        typer.echo("Spec: ARCH:TAG | ARCH:/path/to/weights | ARCH:random   (default ViT-L-14:openai)")
        for arch, tags in items:
            typer.echo(f"{arch:40s} {', '.join(tags) if tags else '(no pretrained tags: use a file or random)'}")

    _run(go)


@app.command()
def heads(json_out: bool = typer.Option(False, "--json", help="Print one JSON object")) -> None:
    """List detector heads with their parameters and defaults (set them with fit --param key=value)."""

    def go():
        from .detectors import describe_heads

        items = describe_heads()
        if json_out:
            typer.echo(json.dumps({n: {"description": d, "params": p} for n, d, p in items}, indent=1))
            return
        for name, desc, params in items:
            typer.echo(f"{name:9s} {desc}")
            typer.echo("          " + ", ".join(f"{k}={v!r}" for k, v in params.items()))

    _run(go)


@app.command()
def fit(
    paths: List[str] = typer.Argument(None, help="Reference images (folders/files/-); default: every labelled "
                                      "image in the cache for the backbone"),
    head: str = typer.Option("svm", "--head", help="Head name (see clipdet heads)"),
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
) -> None:
    """Fit a few-shot detector from cached features (images not yet cached are extracted first)."""
    _quiet_warnings(quiet)

    def go():
        from .fewshot import fit as run_fit
        from .fewshot import parse_params

        det = run_fit(paths or None, head=head, shots=shots, seed=seed, backbone=backbone, cache=cache,
                      manifest=manifest, view=view, augment_views=augment_views, per_generator=per_generator,
                      exclude_generators=exclude_generator or (), params=parse_params(param or []),
                      calibrate=calibrate or None, target_fpr=target_fpr, attribute=attribute, device=device,
                      quiet=quiet)
        det.save(out)
        for path, reason in getattr(det, "skipped", []):
            err(f"skipped {path}: {reason}")
        for note in det.meta.get("notes", []):
            err(f"note: {note}")
        typer.echo(f"wrote {out}: {det.summary()}")
        return det

    det = _run(go)
    raise typer.Exit(EXIT_PARTIAL if getattr(det, "skipped", []) else EXIT_OK)


@app.command()
def score(
    paths: List[str] = typer.Argument(None, help="Folders (recursive), image files, or - for paths on stdin"),
    detector: str = typer.Option(..., "--detector", "-d", help="Detector file from clipdet fit"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="FILE.csv, FILE.jsonl, or - for CSV on stdout"),
    cache: Optional[str] = CacheOpt,
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
) -> None:
    """Score images: one row per input (path, sha256, score, p_fake, label, generator, nearest, error)."""
    _quiet_warnings(quiet)
    state = {"errors": 0}

    def go():
        from .detector import Detector
        from .scoring import RowWriter, score_refs, summarise, verdict

        det = Detector.load(detector)
        refs = _refs(paths or [], manifest)
        t = det.threshold if threshold is None else threshold
        # The format follows the options, never the number of images found: verdicts for one FILE
        # argument or --verdict, else CSV/JSONL rows (on stdout without --out).
        one_file = len(paths or []) == 1 and not manifest and paths[0] != "-" and not os.path.isdir(paths[0])
        verdicts = (verdict_out or one_file) and out != "-"
        dest = out if (out or verdicts) else "-"
        writer = RowWriter(dest)
        counts: dict[str, int] = {}
        n = 0
        try:
            for row in score_refs(refs, det, cache=cache, device=device, threshold=threshold, backbone=backbone,
                                  batch_size=batch_size, workers=workers, quiet=quiet, precision=precision,
                                  on_chunk=writer.flush):
                writer.write(row)
                n += 1
                counts[row["label"]] = counts.get(row["label"], 0) + 1
                if row["error"]:
                    state["errors"] += 1
                    if not verdicts:
                        err(f"skipped {row['path']}: {row['error']}")
                if verdicts:
                    typer.echo(verdict(row, t))
            writer.finish()
        finally:
            writer.close()
        if not one_file or not verdicts:
            line = summarise(counts, state["errors"], n) + (f"; rows in {dest}" if dest and dest != "-" else "")
            (err if dest == "-" or verdicts else typer.echo)(line)
        _discovery_summary(refs)

    _run(go)
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
) -> None:
    """Measure a detector on labelled images: AUC, AP, accuracy, TPR@1%FPR, EER, ECE, Brier, per generator."""
    _quiet_warnings(quiet)

    def go():
        from .detector import Detector
        from .evaluate import evaluate, json_safe, public, write_report
        from .images import parse_views

        det = Detector.load(detector)
        if report:
            from .report import prepare_output_dir

            prepare_output_dir(report, "--report")  # before scoring, not after
        refs = _refs(paths or [], manifest)
        extra = parse_views(views)[1:] if views else []
        res = evaluate(refs, det, cache=cache, views=extra, allow_overlap=allow_overlap,
                       exclude_references=exclude_references, device=device, quiet=quiet, backbone=backbone)
        if json_out:
            typer.echo(json.dumps(json_safe(public(res)), indent=1, allow_nan=False))
        else:
            m = res["metrics"]
            if res["detector"].get("backbone_weights") == "random":
                from .report import RANDOM_WEIGHTS_WARNING

                typer.echo(RANDOM_WEIGHTS_WARNING.replace("**", ""))
            typer.echo(f"{m['n']} images ({m['n_real']} real, {m['n_fake']} fake): AUC {m['auc']:.3f}, "
                       f"AP {m['ap']:.3f}, acc {m['accuracy']:.3f}, bal.acc {m['balanced_accuracy']:.3f}, "
                       f"TPR@1%FPR {m['tpr_at_1pct_fpr']:.3f}, EER {m['eer']:.3f}, ECE {m['ece']:.3f}, "
                       f"Brier {m['brier']:.3f}")
            for g, a in res["per_generator_auc"].items():
                typer.echo(f"  {g:24s} AUC {a:.3f}")
            for v, r in res.get("robustness", {}).items():
                typer.echo(f"  view {v:19s} AUC {r['auc']:.3f}")
            for n in res["notes"]:
                typer.echo(f"note: {n}")
        _discovery_summary(refs)
        if report:
            path = write_report(res, report)
            if not json_out:
                typer.echo(f"report: {path}")
        return res

    res = _run(go)
    raise typer.Exit(EXIT_PARTIAL if res["n_errors"] else EXIT_OK)


@cache_app.command("info")
def cache_info(
    cache: Optional[str] = CacheOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the same as one JSON object"),
) -> None:
    """Backbones, views, image counts per label and generator, and size on disk."""

    def go():
        from .cache import FeatureCache

        fc = FeatureCache(cache)
        if not fc.exists():
            from .errors import CacheError

            raise CacheError(f"{fc.path}: no feature cache here yet (run clipdet extract)")
        info = fc.info()
        if json_out:
            typer.echo(json.dumps(info, indent=1, sort_keys=True))
            return
        typer.echo(f"{info['path']}: {info['images']} images, {info['size_bytes'] / 1e6:.1f} MB, "
                   f"{info['errors']} recorded errors, {info['pending_shards']} pending shards")
        for f in info["features"]:
            labels = ", ".join(f"{k} {v}" for k, v in f["labels"].items())
            typer.echo(f"  {f['backbone']} [{f['backbone_key']}] view {f['view']}: {f['images']} images "
                       f"(dim {f['dim']}{', layers ' + str(f['layers']) if f['layers'] else ''}; {labels})")
            if f["generators"]:
                typer.echo("    generators: " + ", ".join(f"{k} {v}" for k, v in f["generators"].items()))

    _run(go)


@cache_app.command("compact")
def cache_compact(cache: Optional[str] = CacheOpt) -> None:
    """Merge pending shards (left by interrupted or concurrent runs) into the main cache file."""

    def go():
        from .cache import FeatureCache

        n = FeatureCache(cache).compact()
        typer.echo(f"merged {n} shard(s)")

    _run(go)


@cache_app.command("errors")
def cache_errors(cache: Optional[str] = CacheOpt) -> None:
    """Files that could not be used, with the reason (one per line: path<TAB>reason)."""

    def go():
        from .cache import FeatureCache

        for e in FeatureCache(cache).errors():
            typer.echo(f"{e['path']}\t{e['reason']}")

    _run(go)


from .cli_bench import register as _register_bench  # noqa: E402  (after every command above)

_register_bench(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `clipdet score ... | head`
        sys.stderr.close()
        sys.exit(EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
