"""Prometheus metrics of the gateway (default registry; `/metrics` is served by the app).

`key` labels are API key ids (a hash prefix of the bearer token, or the security principal's id),
never the token itself. Their cardinality is bounded (`[gateway] metrics_keys`): the first N keys a
worker sees keep their own series, later ones are counted as `key="other"`; 0 counts all as `"-"`.
"""

from __future__ import annotations

from typing import Generic

from prometheus_client import Counter, Gauge, Histogram, Summary

from xcstack.observability.metrics import BoundedLabel, Children, M

#: the per-key label of this process (`limit_keys` sets N from the settings when the gateway starts)
KEYS = BoundedLabel(100)


def limit_keys(n: int) -> None:
    """Set N of the `key` label: keys already given a series keep it."""
    KEYS.limit = n


class Keyed(Generic[M]):
    """A metric whose first label is an API key: `labels(key, ...)` bounds the key (`KEYS`) and
    caches the child, so callers use it as they would the metric itself."""

    def __init__(self, metric: M, keys: BoundedLabel = KEYS) -> None:
        self.metric = metric
        self.keys = keys
        self._children = Children(metric)

    def labels(self, key: str, *rest: str) -> M:
        return self._children(self.keys(key), *rest)

REQUESTS = Counter(
    "xc_gateway_requests", "Gateway requests by endpoint, model and status", ["endpoint", "model", "status"]
)
IN_FLIGHT = Gauge("xc_gateway_in_flight", "Requests holding a global in-flight slot", multiprocess_mode="livesum")
UPSTREAM_IN_FLIGHT = Gauge(
    "xc_gateway_upstream_in_flight", "Requests in flight per upstream", ["upstream"], multiprocess_mode="livesum"
)
UPSTREAM_ATTEMPTS = Counter("xc_gateway_upstream_attempts", "Upstream attempts by outcome", ["upstream", "outcome"])
BREAKER_STATE = Gauge("xc_gateway_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open", ["upstream"])
REJECTED = Counter("xc_gateway_rejected", "Requests rejected by admission control", ["reason"])
RATE_LIMITED = Counter("xc_gateway_rate_limited", "Requests refused by a per-key rate limit", ["limit"])
RATE_LIMIT_BACKEND_ERRORS = Counter("xc_gateway_rate_limit_backend_errors", "Redis limiter failures (local fallback)")
RATE_LIMIT_LOCAL = Counter(
    "xc_gateway_rate_limit_local", "Rate-limit calls the local buckets took instead of Redis, by why "
    "(error: Redis failed or timed out; breaker_open; busy: too many Redis calls in flight)", ["reason"]
)
RATE_LIMIT_BREAKER = Gauge(
    "xc_gateway_rate_limit_breaker_state", "Shared (Redis) rate limiter breaker: 0 closed, 1 open, 2 half-open"
)
DISCONNECTS = Counter("xc_gateway_client_disconnects", "Clients that left before the answer was complete", ["endpoint"])
STREAM_ERRORS = Counter("xc_gateway_stream_errors", "Streams ended by an error event", ["reason"])
TTFT = Histogram(
    "xc_gateway_ttft_seconds",
    "Time to first token (first streamed event) per model",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS_PER_S = Histogram(
    "xc_gateway_tokens_per_second",
    "Completion tokens per second per model: streams after the first token, non-streamed answers over the whole call",
    ["model"],
    buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 5000),
)
KEY_TTFT = Keyed(Summary(
    "xc_gateway_key_ttft_seconds", "Time to first token per API key and model (sum, count: the mean)", ["key", "model"]
))
KEY_GENERATION = Keyed(Summary(
    "xc_gateway_key_generation_seconds",
    "Generation time per API key and model (streams: after the first token; non-streamed: the whole upstream call); "
    "tokens/s = completion tokens / this sum",
    ["key", "model"],
))
TOKENS = Keyed(Counter(
    "xc_gateway_tokens", "Tokens by API key, model and kind (prompt/completion)", ["key", "model", "kind"]
))
JOBS = Counter("xc_gateway_jobs", "Async jobs by final status", ["status"])


def rejected(reason: str) -> None:
    """Count a shed request here and in the project-wide `xc_rejected_total{gate, reason}`."""
    REJECTED.labels(reason).inc()
    try:
        from xcstack.observability.metrics import REJECTED as SHARED
    except ImportError:  # pragma: no cover
        return
    gate, _, why = reason.partition("_")
    SHARED.labels(f"gateway.{gate}", why or reason).inc()
