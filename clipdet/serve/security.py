"""Request limits and authentication for `clipdet serve`."""

from __future__ import annotations

import hmac
import ipaddress
import json

from ..errors import UsageError


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_address(host: str) -> str:
    """The address uvicorn binds: an IPv6 literal without its URL brackets ('[::1]' → '::1')."""
    h = host.strip()
    return h[1:-1] if h.startswith("[") and h.endswith("]") else h


def url_host(host: str) -> str:
    """`host` as it goes in a URL: IPv6 literals in brackets ('::1' → '[::1]')."""
    h = bind_address(host)
    return f"[{h}]" if ":" in h else h


def public_name(path: str | None) -> str | None:
    """A server path as a client may see it: its base name only (either separator), never the folders."""
    if not path:
        return path
    return str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def check_bind(host: str, token: str | None, no_auth: bool) -> None:
    """Refuse to listen beyond loopback without a token, unless the user said --no-auth."""
    if token is not None and not token.strip():
        raise UsageError("--token: empty token")
    if token and no_auth:
        raise UsageError("--token and --no-auth contradict each other; give one")
    if not token and not no_auth and not is_loopback(host):
        raise UsageError(f"--host {host}: listening beyond this machine needs --token TOKEN "
                         "(or --no-auth to serve without authentication)")


def token_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer TOKEN` header."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


#: Host header names always accepted: the loopback names (any port).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name in a Host header, lower-cased, without port, brackets or trailing dot ('[::1]:80' → '::1')."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:].partition("]")[0]
    elif h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


class HostCheckMiddleware:
    """Pure ASGI middleware against DNS rebinding: 400 unless the Host header names an allowed host.

    Allowed: the loopback names, plus `allowed` (`--allow-host`; '*' accepts any host).
    """

    def __init__(self, app, allowed=()):
        self.app = app
        self.allowed = {host_name(h) for h in (*LOOPBACK_HOSTS, *allowed)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)
        raw = next((v for k, v in scope.get("headers", []) if k == b"host"), None)
        name = host_name(raw.decode("latin-1")) if raw is not None else ""
        if name not in self.allowed:
            shown = "no Host header" if raw is None else f"Host {raw.decode('latin-1')[:100]!r}"
            return await _send_json(send, 400, {"error": f"{shown} not allowed: this server answers to "
                                                f"{', '.join(sorted(self.allowed))} (add names with --allow-host)"})
        return await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """Raised from `receive` once a request body passes the limit."""


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over `max_bytes`, decided before the body is read whole.

    A Content-Length over the limit is refused before reading a byte; a body without one (chunked)
    is counted as it streams in and refused as soon as it passes the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        mb = self.max_bytes / 1e6
        msg = {"error": f"request body too large (limit {mb:g} MB; see --max-upload-mb)"}
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await _send_json(send, 400, {"error": "bad Content-Length header"})
                if n > self.max_bytes:
                    return await _send_json(send, 413, msg)
        seen = {"bytes": 0, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                seen["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not seen["started"]:
                await _send_json(send, 413, msg)
