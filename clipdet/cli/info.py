"""`clipdet backbones` and `clipdet heads`: what can be used."""

from __future__ import annotations

import json

import typer

from .common import app, run_command


@app.command()
def backbones(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """List known backbone architectures and their pretrained tags (open_clip's, plus built-in test configs)."""

    def go():
        from ..backbones import list_backbones

        items = list_backbones()
        if json_out:
            typer.echo(json.dumps({a: t for a, t in items}, indent=1))
            return
        typer.echo("Spec: ARCH:TAG | ARCH:/path/to/weights | ARCH:random   (default ViT-L-14:openai)")
        for arch, tags in items:
            typer.echo(f"{arch:40s} {', '.join(tags) if tags else '(no pretrained tags: use a file or random)'}")

    run_command(go)


@app.command()
def heads(json_out: bool = typer.Option(False, "--json", help="Print one JSON object")) -> None:
    """List detector heads with their parameters and defaults (set them with fit --param key=value)."""

    def go():
        from ..detectors import describe_heads

        items = describe_heads()
        if json_out:
            typer.echo(json.dumps({n: {"description": d, "params": p} for n, d, p in items}, indent=1))
            return
        for name, desc, params in items:
            typer.echo(f"{name:9s} {desc}")
            typer.echo("          " + ", ".join(f"{k}={v!r}" for k, v in params.items()))

    run_command(go)
