"""What every clipdet command shares: the Typer app, common options, one-line errors and exit codes.

Exit codes: 0 all done; 1 done, but some input files were skipped (unreadable or not images);
2 error (bad option, missing weights, damaged cache or detector file; one line on stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from ..errors import ClipdetError, printable

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2

#: the remedy the cache gives for an unwritable cache (cache.files.os_error_message); only `score` has
#: --cache-readonly, so other commands say what works for them instead (`run_command(cache_hint=...)`)
READONLY_HINT = "use --cache-readonly or another --cache"
WRITABLE_CACHE_HINT = "this command writes the cache: give a --cache where you can write (or copy the cache there)"

app = typer.Typer(
    name="clipdet",
    help="Tell AI-generated images from real photographs with frozen CLIP embeddings and few-shot heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is literal: "[default: ...]" must not be eaten as rich markup
)


def _print_version(value: bool) -> None:
    if value:
        from .._version import __version__

        typer.echo(f"clipdet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print clipdet's version and exit")) -> None:
    """Tell AI-generated images from real photographs with frozen CLIP embeddings and few-shot heads."""


def err(msg: str) -> None:
    """Print one line to stderr (a non-UTF-8 file name in it backslash-escaped, see `printable`)."""
    typer.echo(printable(msg), err=True)


def run_command(fn, cache_hint: str = WRITABLE_CACHE_HINT):
    """Run `fn`, turning clipdet errors into one-line messages and exit code 2; an unwritable cache's
    remedy becomes `cache_hint` (READONLY_HINT for a command that has --cache-readonly)."""
    try:
        return fn()
    except ClipdetError as e:
        err(f"clipdet: error: {str(e).replace(READONLY_HINT, cache_hint)}")
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


def quiet_warnings(quiet: bool) -> None:
    import warnings

    warnings.simplefilter("default")
    warnings.formatwarning = lambda m, c, *a, **k: f"clipdet: warning: {printable(str(m))}\n"  # type: ignore[assignment]
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")

