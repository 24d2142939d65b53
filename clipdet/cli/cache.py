"""`clipdet cache ...`: inspect and maintain the feature cache (thin over clipdet.cache)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

cache_app = typer.Typer(help="Inspect and maintain the feature cache.", no_args_is_help=True, rich_markup_mode=None)


def register(app: typer.Typer) -> None:
    """Add the `cache` command group to `app`."""
    from .common import quiet_warnings, run_command
    from .options import CacheOpt

    @cache_app.command("info")
    def cache_info(
        cache: Optional[str] = CacheOpt,
        json_out: bool = typer.Option(False, "--json", help="Print the same as one JSON object"),
    ) -> None:
        """Backbones, views, image counts per label and generator, size on disk (reads the index only)."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache
            from ..cache.model import heads_text
            from ..errors import CacheError

            fc = FeatureCache(cache)
            if not fc.exists():
                raise CacheError(f"{fc.path}: no feature cache here yet (run clipdet extract)")
            info = fc.info()
            if json_out:
                typer.echo(json.dumps(info, indent=1, sort_keys=True))
                return
            typer.echo(f"{info['path']}: {info['images']} images, {info['size_bytes'] / 1e6:.1f} MB in "
                       f"{info['segments']} segment(s) (format v{info['format_version']}), {info['errors']} "
                       f"recorded errors, {info['conflicts']} conflicting labels")
            for f in info["features"]:
                if f["view"] == "text":  # clipdet.text.TEXT_VIEW: prompt and caption embeddings, not images
                    typer.echo(f"  {f['backbone']} [{f['backbone_key']}] text embeddings: {f['images']} texts "
                               f"(dim {f['dim']}; prompts and captions, keyed by SHA-256 of the text)")
                    continue
                labels = ", ".join(f"{k} {v}" for k, v in f["labels"].items())
                typer.echo(f"  {f['backbone']} [{f['backbone_key']}] view {f['view']}: {f['images']} images "
                           f"(dim {f['dim']}{', layers ' + str(f['layers']) if f['layers'] else ''}"
                           f"{', attention heads of ' + heads_text(f['heads']) if f['heads'] else ''}; {labels})")
                if f["generators"]:
                    typer.echo("    generators: " + ", ".join(f"{k} {v}" for k, v in f["generators"].items()))
                pool = f["labels"].get("real", 0) + f["labels"].get("fake", 0)
                typer.echo(f"    reference pool (what fit without PATH draws from): {pool} labelled images, "
                           "from clipdet extract or fit PATH"
                           + (f"; {f['labels']['unlabelled']} unlabelled (scored, evaluated or --calibrate "
                              "images; never references)" if f["labels"].get("unlabelled") else ""))

        run_command(go)

    @cache_app.command("compact")
    def cache_compact(
        cache: Optional[str] = CacheOpt,
        full: bool = typer.Option(False, "--full", help="Merge every segment into one (rewrites the whole cache)"),
    ) -> None:
        """Run the tiered merges now (small segments into bigger ones), or everything with --full."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache

            n = FeatureCache(cache).compact(full=full)
            typer.echo(f"merged {n} segment(s)")

        run_command(go)

    @cache_app.command("upgrade")
    def cache_upgrade(cache: Optional[str] = CacheOpt) -> None:
        """Convert a clipdet 0.1 cache (format v1) to segments; the old file stays untouched on failure."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache

            fc = FeatureCache(cache)
            v = fc.info()["format_version"]
            n = fc.compact(full=True)
            typer.echo(f"{fc.path}: format v2, {len(fc.segments())} segment(s)"
                       + (f" (converted from v1, {n} file(s) merged)" if v == 1 else " (already v2)"))

        run_command(go)

    @cache_app.command("errors")
    def cache_errors(cache: Optional[str] = CacheOpt) -> None:
        """Files that could not be used, with the reason (one per line: path<TAB>reason)."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache

            rows = FeatureCache(cache).errors()
            for e in rows:
                typer.echo(f"{e['path']}\t{e['reason']}")
            if not rows:
                typer.echo("none (no file errors recorded)", err=True)

        run_command(go)

    @cache_app.command("conflicts")
    def cache_conflicts(
        cache: Optional[str] = CacheOpt,
        json_out: bool = typer.Option(False, "--json", help="One JSON object per line"),
    ) -> None:
        """Images recorded with disagreeing labels (left out of fit and eval): sha256, label, path."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache

            rows = FeatureCache(cache).conflicts()
            for c in rows:
                if json_out:
                    typer.echo(json.dumps(c))
                    continue
                for lab, gen, path in c["observations"]:
                    typer.echo(f"{c['sha256']}\t{lab}{'/' + gen if gen else ''}\t{path}")
            if not rows:
                typer.echo("none (no image recorded with disagreeing labels)", err=True)
            return 1 if rows else 0

        raise typer.Exit(run_command(go) or 0)

    @cache_app.command("verify")
    def cache_verify(
        cache: Optional[str] = CacheOpt,
        repair: bool = typer.Option(False, "--repair", help="Drop damaged rows; set unreadable segments aside"),
    ) -> None:
        """Check every segment's checksums and every embedding (finite, unit length). Exit 1 if damaged."""

        def go():
            quiet_warnings(False)
            import os

            from ..cache import FeatureCache
            from ..cache.verify import verify

            fc = FeatureCache(cache)
            rep = verify(fc, repair=repair)
            if rep.rebuilt is not None:
                typer.echo(f"{fc.path}: the catalogue was damaged: rebuilt from {rep.rebuilt} segment(s) "
                           f"(the damaged file is kept as {os.path.basename(fc.path)}.bad)", err=True)
            for p in rep.unreadable:
                typer.echo(f"{p}: unreadable segment" + (" (set aside as .bad)" if repair else ""), err=True)
            for p in rep.missing:
                typer.echo(f"{p}: segment missing" + (" (dropped from the catalogue)" if repair else ""), err=True)
            for p, table, why in rep.bad_index:
                typer.echo(f"{p}: {table}: {why}" + (" (rebuilt from the hash column)" if repair else ""), err=True)
            for p, grp, sha in rep.damaged[:20]:
                typer.echo(f"{p}: {grp}: damaged row {sha}", err=True)
            if len(rep.damaged) > 20:
                typer.echo(f"... and {len(rep.damaged) - 20} more damaged rows", err=True)
            typer.echo(f"{rep.segments} segment(s), {rep.rows} rows checked: {len(rep.damaged)} damaged row(s), "
                       f"{len(rep.bad_index)} damaged index(es), {len(rep.unreadable)} unreadable segment(s)"
                       + (f", {len(rep.missing)} missing segment(s)" if rep.missing else "")
                       + (f"; repaired {len(rep.repaired)} segment(s)" if repair else ""))
            return 0 if rep.ok or repair else 1

        raise typer.Exit(run_command(go) or 0)

    @cache_app.command("import")
    def cache_import(
        sources: List[str] = typer.Argument(..., help="Parquet files/folders or clip-retrieval output folders"),
        backbone: str = typer.Option(..., "--backbone", "-b", help="The backbone that made the embeddings"),
        view: str = typer.Option("clean", "--view", help="Which view these embeddings are of"),
        cache: Optional[str] = CacheOpt,
    ) -> None:
        """Import embeddings (Parquet: sha256 or path, embedding; optional label, generator, path). Exit 1 if
        any row was rejected (counted and named); the good rows land."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache
            from ..extract.ingest import import_embeddings
            from ..extract.views import canonical_view

            s = import_embeddings(FeatureCache(cache), list(sources), backbone, canonical_view(view))
            for e in s.examples:
                typer.echo(f"clipdet: rejected: {e}", err=True)
            typer.echo(f"imported {s.rows} row(s), rejected {s.rejected}")
            return 1 if s.rejected else 0

        raise typer.Exit(run_command(go) or 0)

    @cache_app.command("export")
    def cache_export(
        out: str = typer.Argument(..., help="Output .parquet file"),
        fmt: str = typer.Option("parquet", "--format", help="Only parquet"),
        backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Which backbone (if several)"),
        view: str = typer.Option("clean", "--view", help="Which view's embeddings: clean, or a perturbed view "
                                 "extract --views made, e.g. jpeg:75"),
        cache: Optional[str] = CacheOpt,
    ) -> None:
        """Export one backbone's embeddings with sha256, label, generator and path columns."""

        def go():
            quiet_warnings(False)
            from ..cache import FeatureCache
            from ..cache.transfer import export_parquet
            from ..errors import UsageError
            from ..extract.views import canonical_view
            from ..fit.pools import resolve_backbone_key

            if fmt != "parquet":
                raise UsageError(f"--format {fmt}: only parquet is supported")
            fc = FeatureCache(cache)
            v = canonical_view(view)
            key, _ = resolve_backbone_key(fc, backbone, v)
            n = export_parquet(fc, out, key, v)
            typer.echo(f"{out}: {n} row(s)")

        run_command(go)

    app.add_typer(cache_app, name="cache")
