"""Inference metrics (prometheus_client). Model workers inherit PROMETHEUS_MULTIPROC_DIR from the
supervisor, so their samples reach /metrics of any http worker."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from xcstack.observability.metrics import LATENCY_BUCKETS, Children

BATCH_ROWS = Histogram(
    "xc_inference_batch_rows",
    "Rows per model run",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_SECONDS = Histogram("xc_inference_run_seconds", "Model run time per batch", ["model"], buckets=LATENCY_BUCKETS)
QUEUE_ROWS = Gauge(
    "xc_inference_queue_rows", "Rows waiting in a model's batcher", ["model"], multiprocess_mode="livesum"
)
DROPPED = Counter("xc_inference_dropped_total", "Queued rows dropped before running", ["model", "reason"])
REQUESTS = Counter("xc_inference_requests_total", "Inference requests by outcome", ["model", "api", "outcome"])
DEPARTED = Counter(
    "xc_inference_departed_total",
    "Requests whose HTTP client disconnected while they waited for their batch; their work was cancelled"
    " (queued rows withdrawn, counted in xc_inference_dropped_total{reason=\"cancelled\"} where they ran)",
    ["model", "api"],
)
DEVICE_LIVE_BYTES = Gauge(
    "xc_inference_device_live_bytes",
    "Bytes held in device buffers (OrtValues) right now",
    ["device"],
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter("xc_inference_worker_unavailable_total", "Calls that found a model worker down", ["worker"])


_REQUESTS = Children(REQUESTS, limit=4096)  # model names come from the repository


def count_request(model: str, api: str, outcome: str) -> None:
    """REQUESTS.labels(...).inc() with the child cached."""
    _REQUESTS(model, api, outcome).inc()


def count_departed(model: str, api: str) -> None:
    """A client left while its request waited: DEPARTED, and REQUESTS with outcome "departed"."""
    DEPARTED.labels(model, api).inc()  # rare: no cached child
    count_request(model, api, "departed")
