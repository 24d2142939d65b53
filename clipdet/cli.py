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

BackboneOpt = typer.Option(None, "--backbone", "-b", help="ARCH:PRETRAINED, ARCH:/path/to/weights or ARCH:random "
                           "[default: ViT-L-14:openai, or the only backbone in the cache]")
CacheOpt = typer.Option(None, "--cache", "-c", help="Feature cache file [default: $CLIPDET_CACHE or cache/clipdet.h5]")
ManifestOpt = typer.Option(None, "--manifest", "-m", help="CSV with columns path,label,generator")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or per-file lines; summary only")
CaptionsOpt = typer.Option(None, "--captions", help="CSV with columns sha256 or path, and caption: captions for "
                           "detectors with --features image+text or residual (a manifest's caption column works too)")
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


def _captions_for(det, refs, captions: Optional[str], what: str):
    """Captions for scoring with `det` (None for image features); refuses caption features without any."""
    from .text import needs_captions, read_captions
    from .text.features import no_captions_error

    if not needs_captions(det.features):
        return None
    caps = read_captions(captions)
    if not len(caps) and not any(getattr(r, "caption", None) for r in refs):
        raise no_captions_error(what, det.features)
    return caps


def _layers(spec: Optional[str]) -> tuple[int, ...]:
    from .errors import UsageError

    if not spec:
        return ()
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--layers {spec!r}: expected comma-separated block indices like -1,-4,-8") from None


def _engine(name: str, ray_address: str | None = None) -> str:
    from .engine import check_engine
    from .errors import UsageError

    if ray_address and name != "ray":
        raise UsageError(f"--ray-address {ray_address}: only used with --engine ray (this run: --engine {name})")
    return check_engine(name)


def _quiet_warnings(quiet: bool) -> None:
    import warnings

    warnings.simplefilter("default")
    warnings.formatwarning = lambda m, c, *a, **k: f"clipdet: warning: {m}\n"  # type: ignore[assignment]
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


# ---- engines (issue 9): where extraction runs ------------------------------------------------------------
EngineOpt = typer.Option("local", "--engine", help="local (threads in this process) or ray (Ray Data stages on a "
                         "Ray cluster; images must be readable from every node)")
RayAddressOpt = typer.Option(None, "--ray-address", help="Ray head HOST:PORT for --engine ray [default: "
                             "$RAY_ADDRESS, else a local Ray started for the run]")


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
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="Also store the direct contribution of "
                                        "every attention head of the last N blocks (ViT backbones; for fit "
                                        "--head heads)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass "
                                             "[default: 32 on CPU, 256 on CUDA]"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding threads (0: decode in the "
                                          "main thread) [default: by device]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    rehash: bool = typer.Option(False, "--rehash", help="Hash every file even when the stat index says it is "
                                "unchanged since an earlier run"),
    draft: bool = typer.Option(False, "--draft/--no-draft", help="Decode large JPEGs at reduced scale when the "
                               "model needs far fewer pixels: faster, features within cosine ~0.998 (see README)"),
    precision: str = PrecisionOpt,
    quiet: bool = QuietOpt,
    engine: str = EngineOpt,
    ray_address: Optional[str] = RayAddressOpt,
) -> None:
    """Embed images into the feature cache (content-addressed: re-runs only embed what is new)."""
    _quiet_warnings(quiet)

    def go():
        from .backbones import DEFAULT_BACKBONE
        from .extract import extract as run_extract

        refs = _refs(paths or [], manifest)
        s = run_extract(refs, backbone or DEFAULT_BACKBONE, cache=cache, views=views, batch_size=batch_size,
                        workers=workers, device=device, layers=_layers(layers) or None, quiet=quiet, draft=draft,
                        precision=precision, rehash=rehash, heads=heads, engine=_engine(engine, ray_address),
                        ray_address=ray_address)
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
    prune: int = typer.Option(0, "--prune", min=0, help="Remove the K embedding components whose removal most "
                              "improves leave-one-generator-out AUC on the references (greedy; 0: off)"),
    prune_basis: str = typer.Option("coord", "--prune-basis", help="Components --prune removes: coord "
                                    "(coordinates) or pca (principal directions of the references)"),
    features: str = typer.Option("image", "--features", help="What the head sees: image, image+text (image and "
                                 "caption embeddings) or residual (image minus its caption's direction); "
                                 "the last two need captions"),
    captions: Optional[str] = CaptionsOpt,
) -> None:
    """Fit a few-shot detector from cached features (images not yet cached are extracted first).

    --head zeroshot --shots 0 needs no references (prompts only; uncalibrated)."""
    _quiet_warnings(quiet)

    def go():
        from .fewshot import fit as run_fit
        from .fewshot import parse_params

        det = run_fit(paths or None, head=head, shots=shots, seed=seed, backbone=backbone, cache=cache,
                      manifest=manifest, view=view, augment_views=augment_views, per_generator=per_generator,
                      exclude_generators=exclude_generator or (), params=parse_params(param or []),
                      calibrate=calibrate or None, target_fpr=target_fpr, attribute=attribute, device=device,
                      quiet=quiet, prune=prune, prune_basis=prune_basis, features=features, captions=captions)
        det.save(out)
        for path, reason in getattr(det, "skipped", []):
            err(f"skipped {path}: {reason}")
        for note in det.meta.get("notes", []) + getattr(det, "input_notes", []):
            err(f"note: {note}")
        typer.echo(f"wrote {out}: {det.summary()}")
        for line in det.explain():
            typer.echo(line)
        return det

    det = _run(go)
    raise typer.Exit(EXIT_PARTIAL if getattr(det, "skipped", []) else EXIT_OK)


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
) -> None:
    """Score images: one row per input (path, sha256, score, p_fake, label, generator, nearest, error)."""
    _quiet_warnings(quiet)
    state = {"errors": 0, "uncaptioned": 0}

    def go():
        from .cache import FeatureCache
        from .detector import Detector
        from .scoring import RowWriter, score_refs, summarise, verdict
        from .text import MISSING_CAPTION

        det = Detector.load(detector)
        refs = _refs(paths or [], manifest)
        caps = _captions_for(det, refs, captions, "score")
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
            fc = FeatureCache(cache, readonly=cache_readonly)
            for row in score_refs(refs, det, cache=fc, device=device, threshold=threshold, backbone=backbone,
                                  batch_size=batch_size, workers=workers, quiet=quiet, precision=precision,
                                  on_chunk=writer.flush, captions=caps, engine=_engine(engine, ray_address),
                                  ray_address=ray_address):
                writer.write(row)
                n += 1
                counts[row["label"]] = counts.get(row["label"], 0) + 1
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
                f"; rows in {dest}" if dest and dest != "-" else "")
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
    captions: Optional[str] = CaptionsOpt,
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
                       exclude_references=exclude_references, device=device, quiet=quiet, backbone=backbone,
                       captions=_captions_for(det, refs, captions, "eval"))
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


# ---------------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    detector: str = typer.Option(..., "--detector", "-d", help="Detector file from clipdet fit"),
    cache: Optional[str] = typer.Option(None, "--cache", "-c", help="Feature cache: features of images already "
                                        "in it are reused (nothing is written unless --cache-write)"),
    cache_write: bool = typer.Option(False, "--cache-write", help="Add features of new uploads to --cache"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (beyond loopback needs --token "
                             "or --no-auth)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="CLIPDET_TOKEN", help="Require 'Authorization: "
                                        "Bearer TOKEN' on every API call [env CLIPDET_TOKEN]"),
    no_auth: bool = typer.Option(False, "--no-auth", help="Allow listening beyond loopback without a token"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest request body, in MB "
                                        "(larger: 413)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="Most images per model batch "
                                            "[default: 32 on CPU, 256 on CUDA]"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="How long a batch waits for more "
                                      "images once it has one"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decoding threads"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold on the score "
                                              "[default: the detector's calibrated one]"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Override the detector's backbone "
                                           "spec (e.g. weights moved); must be the same weights"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    precision: str = PrecisionOpt,
    captions: Optional[str] = typer.Option(None, "--captions", help="CSV with columns sha256 and caption, for "
                                           "detectors with caption features (requests may also send a "
                                           "'captions' form field per file)"),
) -> None:
    """Serve the detector over HTTP: POST /v1/score, GET /v1/detector, /healthz, /metrics, and a web page at /."""

    def go():
        from .detector import Detector
        from .errors import UsageError
        from .extract import default_batch_size

        try:
            import uvicorn

            from .serve import Engine, ServeOptions, check_bind, create_app
        except ImportError as e:
            raise UsageError(f"clipdet serve needs the 'serve' extra: pip install 'clipdet[serve]' ({e})") from None
        check_bind(host, token, no_auth)
        if cache_write and not cache:
            raise UsageError("--cache-write needs --cache FILE")
        det = Detector.load(detector)
        from .text import read_captions

        engine = Engine(det, cache=cache, cache_write=cache_write, device=device, precision=precision,
                        threshold=threshold, backbone=backbone, captions=read_captions(captions))
        opts = ServeOptions(token=token, max_upload_mb=max_upload_mb, max_wait_ms=max_wait_ms,
                            max_batch=max_batch or default_batch_size(device), decode_workers=workers)
        err(f"clipdet serve: http://{host}:{port}/ ({'token required' if token else 'no token'}; Ctrl-C stops)")
        try:
            uvicorn.run(create_app(engine, opts), host=host, port=port, log_level="warning", access_log=False)
        except SystemExit as e:  # uvicorn exits 3 when it cannot bind (its reason is on the line above)
            if e.code not in (0, None):
                raise UsageError(f"cannot serve on {host}:{port} (see the message above)") from None

    _run(go)


# ---- clipdet finetune (issue 13) -------------------------------------------------------------------------


@app.command()
def finetune(
    paths: List[str] = typer.Argument(None, help="Labelled training images (layout real/**, fake/<generator>/**)"),
    backbone: Optional[str] = BackboneOpt,
    out: str = typer.Option(..., "--out", "-o", help="Output folder: open_clip_model.safetensors, detector.clipdet, "
                            "train.json, checkpoint.pt"),
    manifest: Optional[str] = ManifestOpt,
    mode: str = typer.Option("lora", "--mode", help="lora (PEFT adapters on attention + MLP projections), "
                             "last-blocks, or full"),
    blocks: int = typer.Option(2, "--blocks", min=1, help="Blocks to unfreeze with --mode last-blocks"),
    lora_rank: int = typer.Option(8, "--lora-rank", min=1, help="LoRA rank (alpha = 2 x rank)"),
    epochs: int = typer.Option(3, "--epochs", min=1, help="Training epochs"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per optimiser step"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the tower (head: 10x) "
                                       "[default: lora 2e-4, last-blocks 2e-5, full 1e-5]"),
    weight_decay: float = typer.Option(0.05, "--weight-decay", min=0.0, help="AdamW weight decay"),
    val: List[str] = typer.Option(None, "--val", help="Held-out validation images (repeatable; refused if they "
                                  "overlap the training images)"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Without --val: fraction of each class held out "
                                       "(drawn by SHA-256 and --seed)"),
    seed: int = typer.Option(0, "--seed", help="Seed for split, order, augmentation, init and the detector"),
    class_weight: str = typer.Option("balanced", "--class-weight", help="balanced (inverse class frequency) or none"),
    focal_gamma: float = typer.Option(0.0, "--focal-gamma", min=0.0, help="Focal loss gamma (0: cross-entropy)"),
    sam_rho: float = typer.Option(0.0, "--sam-rho", min=0.0, help="Sharpness-aware minimisation radius (0: off; "
                                  "doubles the cost of a step)"),
    crop_scale: float = typer.Option(0.5, "--crop-scale", help="Smallest area fraction of the random resized crop"),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips"),
    jpeg_p: float = typer.Option(0.0, "--jpeg-p", help="Probability of a JPEG re-encode (quality 60-95) per image"),
    blur_p: float = typer.Option(0.0, "--blur-p", help="Probability of a Gaussian blur (sigma 0.1-1.5) per image"),
    head: str = typer.Option("svm", "--head", help="Head of the detector fitted on the new features"),
    param: List[str] = typer.Option(None, "--param", "-p", help="Detector head parameter key=value (repeatable)"),
    target_fpr: float = typer.Option(0.05, "--target-fpr", help="Detector threshold's false-positive rate"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, "
                                  "or bf16 (autocast, also on CPU)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding threads [default: by device]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished epoch"),
    quiet: bool = QuietOpt,
) -> None:
    """Fine-tune the backbone's image tower for detection + generator attribution; writes an open_clip
    checkpoint (use it as ARCH:DIR/open_clip_model.safetensors) and a detector fitted on its features."""
    _quiet_warnings(quiet)

    def go():
        from .backbones import DEFAULT_BACKBONE
        from .fewshot import parse_params
        from .finetune import finetune as run_finetune

        r = run_finetune(paths or None, backbone=backbone or DEFAULT_BACKBONE, out=out, manifest=manifest, mode=mode,
                         blocks=blocks, lora_rank=lora_rank, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, val=val or None, val_fraction=val_fraction, seed=seed,
                         class_weight=class_weight, focal_gamma=focal_gamma, sam_rho=sam_rho, crop_scale=crop_scale,
                         flip=flip, jpeg_p=jpeg_p, blur_p=blur_p, head=head, params=parse_params(param or []),
                         target_fpr=target_fpr, device=device, precision=precision, workers=workers, resume=resume,
                         quiet=quiet, log=None if quiet else err)
        for path, reason in r.errors:
            err(f"skipped {path}: {reason}")
        for note in r.notes:
            err(f"note: {note}")
        last = r.history[-1] if r.history else {}
        typer.echo(f"wrote {r.out_dir}: backbone {r.backbone_spec}; detector {r.detector_path}; "
                   f"{len(r.history)} epoch(s), last val AUC {last.get('val_auc')}, classes {', '.join(r.classes)}")
        return r

    r = _run(go)
    raise typer.Exit(EXIT_PARTIAL if r.errors else EXIT_OK)


from .cli_bench import register as _register_bench  # noqa: E402  (after every command above)

_register_bench(app)

from .cli_cache import register as _register_cache  # noqa: E402

_register_cache(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `clipdet score ... | head`
        sys.stderr.close()
        sys.exit(EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
