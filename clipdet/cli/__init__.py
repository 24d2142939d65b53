"""clipdet's command line: parse options, call the library, print. No detection logic lives here.

One module per command group (extract, info, fit, score, serve, finetune, bench, cache, export); `common` holds
the Typer app, the shared options and the error/exit-code wrapper. Importing this package registers
every command, in the order `clipdet --help` lists them.
"""

from __future__ import annotations

import sys

# Each module registers its commands on import, in the order `clipdet --help` lists them.
from . import extract, info, fit, score, serve, finetune  # noqa: F401  isort: skip
from .bench import register as _register_bench
from .cache import register as _register_cache
from .common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, app, err
from .export import register as _register_export

_register_bench(app)
_register_cache(app)
_register_export(app)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_PARTIAL", "app", "err", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `clipdet score ... | head`
        sys.stderr.close()
        sys.exit(EXIT_OK)
