"""The overview's numbers: the worker's Prometheus exposition boiled down to a small JSON snapshot.

Counters and histogram buckets are sent cumulative; the browser keeps the previous snapshot and
draws rates and quantiles from the differences, so the server keeps no per-viewer state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SKIP_ROUTES = ("/console", "/metrics", "/readyz", "/healthz")


def snapshot(text: str) -> dict[str, Any]:
    """{requests, errors, latency: {le: count}, tokens, lag: {le: count}, breakers: {upstream: state}}."""
    out: dict[str, Any] = {"requests": 0.0, "errors": 0.0, "latency": {}, "tokens": 0.0, "lag": {},
                           "breakers": {}, "inflight": {}}
    lat: dict[str, float] = out["latency"]
    lag: dict[str, float] = out["lag"]
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            route = s.labels.get("route", "")
            if fam.name == "xc_http_requests" and s.name.endswith("_total"):
                if route.startswith(SKIP_ROUTES):
                    continue
                out["requests"] += s.value
                if s.labels.get("status", "").startswith("5"):
                    out["errors"] += s.value
            elif s.name == "xc_http_request_duration_seconds_bucket" and not route.startswith(SKIP_ROUTES):
                le = s.labels["le"]
                lat[le] = lat.get(le, 0.0) + s.value
            elif fam.name == "xc_gateway_tokens" and s.name.endswith("_total"):
                out["tokens"] += s.value
            elif s.name == "xc_event_loop_lag_seconds_bucket":
                lag[s.labels["le"]] = lag.get(s.labels["le"], 0.0) + s.value
            elif s.name == "xc_gateway_breaker_state":
                out["breakers"][s.labels.get("upstream", "?")] = int(s.value)
            elif s.name == "xc_gateway_upstream_in_flight":
                out["inflight"][s.labels.get("upstream", "?")] = s.value
    return out


class SharedSnapshot:
    """What the overview shows every viewer alike (its metrics), built at most once per `max_age_s`
    per worker however many consoles poll, one build shared by the polls that wait for it. Rendering every
    worker's samples and parsing them back costs ~15 ms of CPU here: done on the event loop for each poll,
    five consoles polling every 0.5 s raised the gateway's p50 by 48 % (bench/console.py). `build` is a
    coroutine function; blocking work in it goes to a thread (see `in_thread`)."""

    def __init__(self, build: Callable[[], Awaitable[dict[str, Any]]], max_age_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self._value: dict[str, Any] = {}
        self._wall = 0.0
        self.builds = 0

    async def get(self) -> tuple[float, dict[str, Any]]:
        """(wall-clock time the snapshot was taken, the snapshot)."""
        async with self._lock:
            if self._clock() - self._at >= self.max_age_s:
                self._value = await self._build()
                self._at, self._wall = self._clock(), time.time()
                self.builds += 1
            return self._wall, self._value


def in_thread(fn: Callable[[], dict[str, Any]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """`fn` as a coroutine function run in a worker thread (off the event loop)."""
    async def run() -> dict[str, Any]:
        return await asyncio.to_thread(fn)
    return run
