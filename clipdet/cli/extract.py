"""`clipdet extract`: embed images into the feature cache."""

from __future__ import annotations

from typing import List, Optional

import typer

from .common import EXIT_OK, EXIT_PARTIAL, app, err, quiet_warnings, run_command
from .inputs import discovery_summary, engine_option, input_refs, parse_layers
from .options import BackboneOpt, CacheOpt, EngineOpt, ManifestOpt, PrecisionOpt, QuietOpt, RayAddressOpt


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
    quiet_warnings(quiet)

    def go():
        from ..extract.run import default_backbone
        from ..extract.run import extract as run_extract

        refs = input_refs(paths or [], manifest)
        spec = backbone
        if not spec:
            spec, from_cache = default_backbone(cache)
            if from_cache:
                err(f"note: no --backbone: using the cache's only backbone, {spec}")
        s = run_extract(refs, spec, cache=cache, views=views, batch_size=batch_size,
                        workers=workers, device=device, layers=parse_layers(layers) or None, quiet=quiet, draft=draft,
                        precision=precision, rehash=rehash, heads=heads, engine=engine_option(engine, ray_address),
                        ray_address=ray_address)
        for path, reason in s.errors:
            err(f"skipped {path}: {reason}")
        typer.echo(s.line())
        discovery_summary(refs)
        return s

    s = run_command(go)
    raise typer.Exit(EXIT_OK if s.ok else EXIT_PARTIAL)
