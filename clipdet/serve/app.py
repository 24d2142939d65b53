"""The FastAPI application of `clipdet serve`: routes, start-up (model loading), error responses.

Imports FastAPI at module level: this package is only imported by `clipdet serve` (lazily).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ClipdetError
from .batcher import MicroBatcher
from .engine import Engine, default_decode_workers
from .metrics import Metrics, MetricsMiddleware
from .security import BodyLimitMiddleware, BodyTooLarge, HostCheckMiddleware, public_name, token_ok

log = logging.getLogger("clipdet.serve")

MAX_FILES = 100  # files per request
_NAME_MAX = 200


@dataclass
class ServeOptions:
    """Everything `create_app` needs besides the engine."""

    token: str | None = None
    max_upload_mb: float = 20.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    decode_workers: int | None = None
    expose_paths: bool = False  # nearest_path and the cache as server paths (default: base names only)
    allow_hosts: tuple = ()  # Host header names accepted besides the loopback ones ('*': any)

    @property
    def max_bytes(self) -> int:
        """The request-body limit in bytes."""
        return int(self.max_upload_mb * 1_000_000)


def upload_name(raw: str | None, index: int) -> str:
    """The client's file name as a label only: base name, printable, bounded; never used as a path."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()[:_NAME_MAX]
    return name or f"upload-{index + 1}"


def hide_paths(info: dict) -> dict:
    """`GET /v1/detector` without server paths: the cache and a weights file by base name only."""
    out = dict(info)
    if out.get("cache"):
        out["cache"] = public_name(out["cache"])
    spec = out.get("backbone") or ""
    arch, sep, weights = spec.partition(":")
    if sep and ("/" in weights or "\\" in weights):
        out["backbone"] = f"{arch}:{public_name(weights)}"
    return out


def page_html() -> str:
    """The self-contained web page (a package resource)."""
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def create_app(engine: Engine, options: ServeOptions | None = None):
    """Build the FastAPI app around `engine`; the model loads in the background at start-up."""
    opts = options or ServeOptions()
    metrics = Metrics()
    state = {"status": "loading", "error": None}
    model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipdet-model")
    decode_pool = ThreadPoolExecutor(max_workers=opts.decode_workers or default_decode_workers(),
                                     thread_name_prefix="clipdet-decode")
    batcher = MicroBatcher(engine.run_batch, model_pool, max_batch=opts.max_batch, max_wait_ms=opts.max_wait_ms,
                           on_batch=metrics.observe_batch)

    def load_model() -> None:
        try:
            engine.load()
            state["status"] = "ok"
            metrics.ready.set(1)
            log.info("clipdet serve: model loaded (%s)", engine.detector.backbone.get("spec"))
        except ClipdetError as e:
            state["status"], state["error"] = "failed", str(e)
            log.error("clipdet serve: error: %s", e)
        except Exception as e:  # noqa: BLE001 - reported by /healthz, never a traceback to clients
            state["status"], state["error"] = "failed", f"{type(e).__name__}: {e}"
            log.error("clipdet serve: error: cannot load the model (%s: %s)", type(e).__name__, e)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        load = asyncio.get_running_loop().run_in_executor(model_pool, load_model)
        try:
            yield
        finally:
            await batcher.stop()
            await asyncio.wait_for(asyncio.shield(load), timeout=None)
            await asyncio.get_running_loop().run_in_executor(model_pool, engine.close)
            model_pool.shutdown(wait=True)
            decode_pool.shutdown(wait=True)

    app = FastAPI(title="clipdet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.status = engine, metrics, state

    def fail(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req, exc):
        return fail(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, exc):
        return fail(422, "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_req, exc):  # one line in the log, a short JSON message to the client
        log.error("clipdet serve: internal error: %s: %s", type(exc).__name__, exc)
        return fail(500, f"internal error ({type(exc).__name__})")

    def require_token(request: Request) -> None:
        if opts.token and not token_ok(request.headers.get("authorization"), opts.token):
            raise StarletteHTTPException(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                                         headers={"WWW-Authenticate": "Bearer"})

    def require_ready() -> None:
        if state["status"] != "ok":
            detail = "model is loading" if state["status"] == "loading" else f"model failed to load: {state['error']}"
            raise StarletteHTTPException(503, detail, headers={"Retry-After": "5"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache",
                                                  "Content-Security-Policy": "default-src 'self'; img-src 'self' "
                                                  "blob: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

    @app.get("/healthz")
    async def healthz():
        body = {"status": state["status"], "auth": bool(opts.token), "max_upload_mb": opts.max_upload_mb,
                "max_files": MAX_FILES}
        if state["error"]:
            body["error"] = state["error"]
        return JSONResponse(body, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/v1/detector", dependencies=[Depends(require_token)])
    async def detector_info():
        info = {**engine.describe(), "status": state["status"]}
        return info if opts.expose_paths else hide_paths(info)

    @app.get("/metrics", dependencies=[Depends(require_token)])
    async def metrics_page():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/score", dependencies=[Depends(require_token)])
    async def score(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return fail(415, "send multipart/form-data with one or more 'files' fields")
        require_ready()
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        except BodyTooLarge:
            raise
        except StarletteHTTPException as e:  # malformed multipart, too many parts
            return fail(422, f"unreadable multipart body: {e.detail}")
        except Exception as e:  # noqa: BLE001 - e.g. a client that disconnects mid-upload
            return fail(422, f"unreadable multipart body ({type(e).__name__})")
        try:
            uploads = [f for f in form.getlist("files") if hasattr(f, "read")]
            if not uploads:
                return fail(422, "no 'files' field with a file in the form")
            loop = asyncio.get_running_loop()
            named = [(upload_name(f.filename, i), await f.read()) for i, f in enumerate(uploads)]
            texts = [c for c in form.getlist("captions") if isinstance(c, str)]  # i-th caption: i-th file
            field = form.get("stability")
            asked = field if isinstance(field, str) else request.query_params.get("stability")
        finally:
            await form.close()
        try:
            stability = engine.stability_option(asked)
        except ClipdetError as e:
            return fail(422, str(e))
        captions = texts + [""] * (len(named) - len(texts))
        items = await asyncio.gather(*(loop.run_in_executor(decode_pool, engine.prepare, n, d, c, stability)
                                       for (n, d), c in zip(named, captions)))
        del named
        metrics.cache_hits.inc(sum(1 for it in items if it.cached))
        rows = await batcher.submit_many(list(items))
        if not opts.expose_paths:
            rows = [{**r, "nearest_path": public_name(r.get("nearest_path"))} for r in rows]
        metrics.observe_rows(rows)
        body = {"results": rows, "threshold": engine.threshold}
        if stability is not None:
            body["stability"] = {"views": stability, "unsure_band": list(engine.detector.unsure_range(
                engine.threshold) or []) or None}
        return body

    app.add_middleware(BodyLimitMiddleware, max_bytes=opts.max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts 413s too
    app.add_middleware(HostCheckMiddleware, allowed=opts.allow_hosts)  # added last = outermost
    return app


__all__ = ["MAX_FILES", "ServeOptions", "create_app", "hide_paths", "page_html", "upload_name"]
