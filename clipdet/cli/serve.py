"""`clipdet serve`: the HTTP service and its page."""

from __future__ import annotations

from typing import List, Optional

import typer

from .common import app, err, quiet_warnings, run_command
from .options import PrecisionOpt


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
                                        "Bearer TOKEN' on every API call"),
    no_auth: bool = typer.Option(False, "--no-auth", help="Allow listening beyond loopback without a token"),
    allow_host: List[str] = typer.Option(None, "--allow-host", metavar="NAME", help="Also answer requests whose "
                                         "Host header names NAME (repeatable; '*': any). Always answered: "
                                         "localhost, 127.0.0.1, [::1] and the --host address"),
    expose_paths: bool = typer.Option(False, "--expose-paths", help="Show clients server paths (nearest_path, "
                                      "the cache file) instead of base names"),
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
        quiet_warnings(False)  # one line per warning ("clipdet: warning: ..."), not Python's with a source line
        from ..detectors.detector import Detector
        from ..errors import UsageError
        from ..extract.lazy import default_batch_size

        try:
            import uvicorn

            from ..serve import Engine, ServeOptions, check_bind, create_app
            from ..serve.security import bind_address, url_host
        except ImportError as e:
            raise UsageError(f"clipdet serve needs the 'serve' extra: pip install 'clipdet[serve]' ({e})") from None
        check_bind(host, token, no_auth)
        if cache_write and not cache:
            raise UsageError("--cache-write needs --cache FILE")
        det = Detector.load(detector)
        from ..text import read_captions

        engine = Engine(det, cache=cache, cache_write=cache_write, device=device, precision=precision,
                        threshold=threshold, backbone=backbone, captions=read_captions(captions))
        addr = bind_address(host)
        hosts = tuple(allow_host or ()) + (() if addr in ("0.0.0.0", "::", "") else (addr,))
        opts = ServeOptions(token=token, max_upload_mb=max_upload_mb, max_wait_ms=max_wait_ms,
                            max_batch=max_batch or default_batch_size(device), decode_workers=workers,
                            expose_paths=expose_paths, allow_hosts=hosts)
        err(f"clipdet serve: http://{url_host(host)}:{port}/ ({'token required' if token else 'no token'}; "
            "Ctrl-C stops)")
        try:
            uvicorn.run(create_app(engine, opts), host=addr, port=port, log_level="warning", access_log=False)
        except SystemExit as e:  # uvicorn exits 3 when it cannot bind (its reason is on the line above)
            if e.code not in (0, None):
                raise UsageError(f"cannot serve on {host}:{port} (see the message above)") from None

    run_command(go)


# ---- clipdet finetune (issue 13) -------------------------------------------------------------------------
