"""Prometheus metrics of the vector capability (registered in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

OPS = Histogram(
    "xc_vector_op_seconds", "Vector backend operation latency", ["backend", "op", "outcome"], buckets=_BUCKETS
)
POOL_WAIT = Histogram("xc_vector_pool_wait_seconds", "Wait for a vector pool slot", ["pool"], buckets=_BUCKETS)
POOL_BUSY = Gauge("xc_vector_pool_busy", "Vector pool slots in use", ["pool"])
POOL_EXHAUSTED = Counter("xc_vector_pool_exhausted_total", "Acquire timeouts on a vector pool", ["pool"])
BACKEND_UP = Gauge("xc_vector_backend_up", "1 when the vector backend's last health check passed", ["backend"])
ROWS = Counter("xc_vector_rows_total", "Rows written/deleted/returned", ["backend", "op"])
INDEX_BUILD = Histogram(
    "xc_vector_index_build_seconds", "Index build/load duration", ["backend"], buckets=(0.1, 1, 5, 15, 60, 300, 1800)
)
