"""Prometheus metrics of the db bridge (labels: database, query; never parameter values)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

QUERIES = Counter("xc_db_queries_total", "Named queries run by the db bridge", ["database", "query", "outcome"])
QUERY_SECONDS = Histogram(
    "xc_db_query_duration_seconds", "Named query time including the pool wait", ["database"], buckets=_BUCKETS
)
POOL_WAIT_SECONDS = Histogram(
    "xc_db_pool_wait_seconds", "Time a caller waited for a free connection", ["database"], buckets=_BUCKETS
)
POOL_BUSY = Gauge("xc_db_pool_busy", "Connections running a statement or held by a transaction", ["database"])
POOL_UP = Gauge("xc_db_pool_connected", "Worker threads holding a live connection", ["database"])
RECONNECTS = Counter("xc_db_reconnects_total", "Connections replaced (lost, timed out, recycled)", ["database"])
CANCELS = Counter("xc_db_cancels_total", "Server-side cancels sent for timed-out or abandoned statements", ["database"])
REJECTS = Counter("xc_db_rejected_total", "Callers refused: pool full or database down", ["database", "reason"])
