"""Prometheus metrics for `clipdet serve` (own registry per app; text format at GET /metrics)."""

from __future__ import annotations

import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Counters and histograms: requests, images, errors, latency, batch sizes, model time, cache hits."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("clipdet_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("clipdet_request_seconds", "HTTP request latency in seconds", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("clipdet_images", "Uploaded images by outcome (real, fake, error)", ["label"],
                              registry=r)
        self.errors = Counter("clipdet_image_errors", "Uploaded files that could not be scored", registry=r)
        self.cache_hits = Counter("clipdet_cache_hits", "Uploads whose features came from the cache", registry=r)
        self.batch_size = Histogram("clipdet_batch_size", "Images per model batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("clipdet_batch_seconds", "Seconds per model batch (embed + score)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("clipdet_model_ready", "1 once the model is loaded", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one model batch."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_rows(self, rows: list[dict]) -> None:
        """Record the outcome of each scored upload."""
        for row in rows:
            label = "error" if row.get("error") else row.get("label") or "unknown"
            self.images.labels(label).inc()
            if row.get("error"):
                self.errors.inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request and times it, labelled by route template."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "other"  # a template, never the raw client path
            self.metrics.requests.labels(name, str(status["code"])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
