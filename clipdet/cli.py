"""clipdet's command line: parse options, call the library, print. No detection logic lives here.

Exit codes: 0 all done; 1 done, but some input files were skipped (unreadable or not images);
2 error (bad option, missing weights, damaged cache or detector file; one line on stderr).
"""

from __future__ import annotations

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
)
cache_app = typer.Typer(help="Inspect and maintain the feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

BackboneOpt = typer.Option(None, "--backbone", "-b", help="ARCH:PRETRAINED, ARCH:/path/to/weights or ARCH:random "
                           "[default: ViT-L-14:openai, or the only backbone in the cache]")
CacheOpt = typer.Option(None, "--cache", "-c", help="Feature cache file [default: $CLIPDET_CACHE or cache/clipdet.h5]")
ManifestOpt = typer.Option(None, "--manifest", "-m", help="CSV with columns path,label,generator")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or per-file lines; summary only")


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


def _refs(paths: List[str], manifest: Optional[str]):
    from .errors import UsageError
    from .images import discover

    if not paths and not manifest:
        raise UsageError("give at least one PATH (folder, file or - for stdin) or --manifest CSV")
    return discover(paths, manifest=manifest)


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
                                             "[default: 32 on CPU, 128 on CUDA]"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding threads (0: decode in the "
                                          "main thread) [default: by device]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    draft: bool = typer.Option(True, "--draft/--no-draft", help="Decode large JPEGs at reduced scale when the "
                               "model needs far fewer pixels (see README)"),
    quiet: bool = QuietOpt,
) -> None:
    """Embed images into the feature cache (content-addressed: re-runs only embed what is new)."""
    _quiet_warnings(quiet)

    def go():
        from .backbones import DEFAULT_BACKBONE
        from .extract import extract as run_extract

        refs = _refs(paths or [], manifest)
        s = run_extract(refs, backbone or DEFAULT_BACKBONE, cache=cache, views=views, batch_size=batch_size,
                        workers=workers, device=device, layers=_layers(layers), quiet=quiet, draft=draft)
        for path, reason in s.errors:
            err(f"skipped {path}: {reason}")
        typer.echo(s.line())
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `clipdet score ... | head`
        sys.stderr.close()
        sys.exit(EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
