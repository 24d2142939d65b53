"""`clipdet serve`: an HTTP API (FastAPI) and a web page for checking images one at a time.

Needs the `serve` extra (`pip install 'clipdet[serve]'`); nothing here is imported by `clipdet --help`.

    from clipdet.serve import Engine, ServeOptions, create_app
    app = create_app(Engine(Detector.load("det.clipdet")), ServeOptions(token="..."))
"""

from __future__ import annotations

from .app import MAX_FILES, ServeOptions, create_app, page_html
from .engine import Engine
from .security import check_bind, is_loopback

__all__ = ["Engine", "MAX_FILES", "ServeOptions", "check_bind", "create_app", "is_loopback", "page_html"]
