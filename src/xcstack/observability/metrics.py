"""Prometheus metrics shared by every part of xcstack.

With several http worker processes the supervisor sets PROMETHEUS_MULTIPROC_DIR before it starts
them, so every worker writes its samples to files there and `/metrics` (served by any worker)
aggregates all of them. Gauges use `livesum` so a dead worker's in-flight count disappears.
"""

from __future__ import annotations

import os
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

HTTP_REQUESTS = Counter(
    "xc_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "xc_http_request_duration_seconds", "HTTP request time, first byte in to last byte out",
    ["route", "method", "status"], buckets=LATENCY_BUCKETS,
)
HTTP_INFLIGHT = Gauge("xc_http_inflight_requests", "HTTP requests in progress", multiprocess_mode="livesum")
LOOP_LAG = Histogram(
    "xc_event_loop_lag_seconds", "How late the event loop ran a timer (blocked loop = high lag)",
    buckets=LAG_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "xc_queue_depth", "Items waiting in a bounded queue or pool", ["queue"], multiprocess_mode="livesum"
)
REJECTED = Counter("xc_rejected_total", "Requests shed by a full queue, pool or gate", ["gate", "reason"])
CHILD_RESTARTS = Counter("xc_child_restarts_total", "Supervised processes restarted", ["kind"])


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """The labelled children of one metric, each looked up once: `labels()` costs more than the
    update it precedes (a lock and a dict per call), on paths that run per request. At most `limit`
    children are cached (the label values themselves must be bounded by the caller)."""

    def __init__(self, metric: M, limit: int = 10_000) -> None:
        self.metric = metric
        self.limit = limit
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._cache.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if len(self._cache) < self.limit:
                self._cache[values] = child
        return child


class BoundedLabel:
    """Bounds one high-cardinality label (API keys): the first `limit` distinct values a process sees
    keep their own series, every later one is counted as `other`; `limit = 0` counts every value
    as `-` (no per-value series). Series stay stable: a value never moves between them."""

    OTHER = "other"
    NONE = "-"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._kept:
            return value
        if len(self._kept) < self.limit:
            self._kept.add(value)
            return value
        return self.OTHER if self.limit else self.NONE


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> tuple[bytes, str]:
    """The exposition for /metrics: all workers' samples in multi-process mode, else this process's."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if multiprocess_dir():
        _mp.mark_process_dead(pid)
HTTP_EARLY_CLOSES = Counter(
    "xc_http_early_closes_total", "Connections or requests cut short by a request-phase limit", ["reason"]
)
