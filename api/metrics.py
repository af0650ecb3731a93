"""Prometheus metrics of one app: requests by route and status, latency by route, index size.
Each app has its own registry, so several apps in one process (tests) do not collide."""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, n_documents: Callable[[], int], index_bytes: Callable[[], int], batch_stats: Callable[[], dict],
                 slow_requests: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("logra_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("logra_request_seconds", "time to answer an HTTP request", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("logra_index_documents", "documents in the served index", registry=self.registry).set_function(n_documents)
        Gauge("logra_index_bytes", "bytes of the served index folder", registry=self.registry).set_function(index_bytes)
        # Micro-batching: queries computed and the gradient passes they shared (queries / passes = mean batch).
        Gauge("logra_query_jobs", "queries computed since start", registry=self.registry).set_function(
            lambda: batch_stats()["jobs"])
        Gauge("logra_query_passes", "gradient passes those queries shared", registry=self.registry).set_function(
            lambda: batch_stats()["passes"])
        # The heavy lane (api.lanes): token views and valuations running or waiting; what a shutdown drains.
        Gauge("logra_slow_requests", "slow requests running or waiting now", registry=self.registry).set_function(
            slow_requests)


class MetricsMiddleware:
    """Counts and times every HTTP request. Labelled by route template (/documents/{doc_id:path}),
    never by raw path, so ids do not become label values."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = 500, time.perf_counter()

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            route = getattr(scope.get("route"), "path", None)
            label = route if route else ("/static" if scope["path"].startswith("/static/") else "unmatched")
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label, scope["method"]).observe(time.perf_counter() - started)
