"""Prometheus metrics, on a per-app :class:`CollectorRegistry` (never the global one), so tests
can build several apps in one process.

:class:`MetricsMiddleware` labels requests by route template (``/images/{image_id}``), not raw
path, so hostile URLs cannot blow up label cardinality.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class ServiceMetrics:
    """Every metric the service exports, registered on its own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vld_http_requests",
            "HTTP requests served.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vld_http_request_duration_seconds",
            "HTTP request latency.",
            ["endpoint", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            "vld_encode_seconds",
            "One encoder forward pass (a whole batch).",
            ["modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_seconds = Histogram(
            "vld_search_seconds",
            "One query's index search; a batched query observes the FAISS call it shared "
            "with its batch (see vld_search_batch_size).",
            ["modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rerank_seconds = Histogram(
            "vld_rerank_seconds",
            "Teacher re-ranking of one query's shortlist (pixels and forward passes).",
            ["modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vld_batch_size",
            "Queries per encoder forward pass.",
            ["modality"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.search_batch_size = Histogram(
            "vld_search_batch_size",
            "Queries per batched FAISS search (unfiltered queries of one index version).",
            ["index"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vld_queue_depth",
            "Queries admitted and not finished (waiting + encoding).",
            ["modality"],
            registry=r,
        )
        self.rejected = Counter(
            "vld_rejected_queries",
            "Queries refused with 503 because the queue was full.",
            ["modality"],
            registry=r,
        )
        self.index_size = Gauge(
            "vld_index_vectors", "Vectors in the served index.", ["modality"], registry=r
        )
        self.index_version = Gauge(
            "vld_index_version_info", "The served index version (value 1).", ["version"], registry=r
        )
        self.reloads = Counter(
            "vld_index_reloads", "Index reload attempts by outcome.", ["outcome"], registry=r
        )
        for modality in ("text", "image"):
            self.queue_depth.labels(modality).set(0)

    def set_index(self, version: str, image_count: int, caption_count: int) -> None:
        """Publish the served version's name and sizes (the old version's label is dropped)."""
        self.index_version.clear()
        self.index_version.labels(version).set(1)
        self.index_size.labels("image").set(image_count)
        self.index_size.labels("caption").set(caption_count)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware counting and timing each HTTP request by route and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            labels = (endpoint, method if method in _METHODS else "other", str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - started)
