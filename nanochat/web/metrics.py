"""Prometheus metrics of the chat server, served as text at GET /metrics.

Requests (by route and status) and their latency come from an ASGI middleware; tokens, time to first
token and cancellations from the generation handler, once per request; slots and queue are read from
the workers at each scrape. Nothing here runs per token.
"""
from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no `_created` timestamp series beside each counter (process-wide)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Workers:
    """Collects each worker's slots and queue when scraped (a custom collector: no bookkeeping per step)."""

    def __init__(self, workers: list):
        self.workers = workers

    def collect(self):
        slots = GaugeMetricFamily("nanochat_slots", "decode slots (sequences decoded together)", labels=["worker"])
        active = GaugeMetricFamily("nanochat_slots_active", "slots decoding a sequence now", labels=["worker"])
        queued = GaugeMetricFamily("nanochat_queued_requests", "requests waiting for free slots", labels=["worker"])
        for i, worker in enumerate(self.workers):
            stats = worker.stats()
            slots.add_metric([str(i)], stats["slots"])
            active.add_metric([str(i)], stats["active"])
            queued.add_metric([str(i)], stats["queued"])
        return [slots, active, queued]


class Metrics:
    """The server's metrics, in a registry of their own (several apps can live in one process)."""

    def __init__(self, workers: list):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("nanochat_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=reg)
        self.latency = Histogram("nanochat_request_duration_seconds",
                                 "from a request's arrival to its response's last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.first_token = Histogram("nanochat_time_to_first_token_seconds",
                                     "from a generation request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                     registry=reg)
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "prompt tokens of generation requests", registry=reg)
        self.completion_tokens = Counter("nanochat_completion_tokens", "tokens generated", registry=reg)
        self.cancelled = Counter("nanochat_cancelled_requests",
                                 "generations ended early because their client went away", registry=reg)
        reg.register(_Workers(workers))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts each HTTP request by route template and status, and times it to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        def send_status(message):  # not a coroutine: one plain call per message sent
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
