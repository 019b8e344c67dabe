"""The overview's numbers: the worker's Prometheus exposition boiled down to a small JSON snapshot.

Counters and histogram buckets are sent cumulative; the browser keeps the previous snapshot and
draws rates and quantiles from the differences, so the server keeps no per-viewer state.
"""

from __future__ import annotations

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
