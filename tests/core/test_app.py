"""The core HTTP surface: error model, body limit, request ids, health, readiness, metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tests.core import probe_capability
from xcstack.app import create_app
from xcstack.config import load_settings

PROBE = ["tests.core.probe_capability"]


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(data_dir=data_dir, server={"max_body_bytes": 4096})
    with TestClient(create_app(settings, PROBE), raise_server_exceptions=False) as c:
        yield c


def assert_error(resp: object, status: int, code: str) -> dict[str, str]:
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    body = resp.json()  # type: ignore[attr-defined]
    assert set(body["error"]) >= {"type", "code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_unknown_route_is_json_404(client: TestClient) -> None:
    err = assert_error(client.get("/nope"), 404, "not_found")
    assert "/nope" in err["message"]


def test_wrong_method_is_json_405(client: TestClient) -> None:
    assert_error(client.get("/v1/echo"), 405, "method_not_allowed")


def test_malformed_json_is_400(client: TestClient) -> None:
    assert_error(client.post("/v1/echo", content=b"{not json"), 400, "invalid_json")
    assert_error(client.post("/v1/echo", content=b""), 400, "invalid_json")


def test_wrong_type_is_400_naming_the_field(client: TestClient) -> None:
    err = assert_error(client.post("/v1/echo", json={"text": "a", "n": "many"}), 400, "invalid_parameter")
    assert err["param"] == "n"


def test_body_over_limit_is_413_declared_and_streamed(client: TestClient) -> None:
    assert_error(client.post("/v1/echo", content=b"x" * 5000), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while reading
        for _ in range(10):
            yield b"y" * 1000

    assert_error(client.post("/v1/echo", content=chunks()), 413, "payload_too_large")


def test_valid_request_and_request_id(client: TestClient) -> None:
    r = client.post("/v1/echo", json={"text": "ab", "n": 2})
    assert r.json() == {"text": "abab"}
    assert len(r.headers["x-request-id"]) == 32
    # the request id is always the server's; a client's own id is echoed apart
    r2 = client.post("/v1/echo", json={"text": "a"}, headers={"X-Request-Id": "trace-123"})
    assert r2.headers["x-request-id"] != "trace-123" and len(r2.headers["x-request-id"]) == 32
    assert r2.headers["x-client-request-id"] == "trace-123"
    r3 = client.get("/healthz", headers={"X-Request-Id": "bad id with spaces\x01"})
    assert r3.headers["x-request-id"] != "bad id with spaces\x01" and "x-client-request-id" not in r3.headers


def test_unhandled_error_hides_the_trace(client: TestClient) -> None:
    r = client.get("/v1/crash")
    err = assert_error(r, 500, "internal_error")
    assert "secret internal detail" not in r.text and "Traceback" not in r.text
    assert r.headers["x-request-id"] in err["message"]


def test_readyz_follows_capabilities(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    probe_capability.READY["ok"] = False
    try:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["probe"] == {"ready": False, "detail": "probe says not ready"}
    finally:
        probe_capability.READY["ok"] = True


def test_metrics_parse_and_include_loop_lag(client: TestClient) -> None:
    client.post("/v1/echo", json={"text": "a"})
    client.get("/nope")
    client.get("/v1/block", params={"s": "0.15"})  # a blocked loop must show in the lag histogram
    time.sleep(0.2)
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"xc_http_requests", "xc_http_request_duration_seconds", "xc_event_loop_lag_seconds",
            "xc_http_inflight_requests"} <= set(families)
    routes = {(s.labels.get("route"), s.labels.get("status"))
              for s in families["xc_http_requests"].samples if s.name == "xc_http_requests_total"}
    assert ("/v1/echo", "200") in routes and ("<unmatched>", "404") in routes
    latency = families["xc_http_request_duration_seconds"].samples
    timed = {(s.labels["route"], s.labels["status"]): s.value for s in latency if s.name.endswith("_count")}
    assert timed[("/v1/echo", "200")] >= 1 and timed[("<unmatched>", "404")] >= 1  # latency per route and status
    lag = {s.labels["le"]: s.value for s in families["xc_event_loop_lag_seconds"].samples
           if s.name.endswith("_bucket")}
    assert lag["+Inf"] > lag["0.1"], "the 150 ms block must appear as a lag sample above 100 ms"


def test_json_logs_carry_the_request_id(client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from xcstack.observability.logs import setup_logging

    setup_logging("INFO", json_format=True)
    try:
        r = client.post("/v1/echo", json={"text": "a"}, headers={"X-Request-Id": "log-check-1"})
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        access = [entry for entry in lines if entry.get("logger") == "xcstack.access"]
        assert access and access[-1]["request_id"] == r.headers["x-request-id"]
        assert access[-1]["client_request_id"] == "log-check-1"
        assert access[-1]["status"] == 200 and access[-1]["route"] == "/v1/echo"
    finally:
        logging.getLogger().handlers.clear()


async def test_client_that_left_is_counted_as_499() -> None:
    from starlette.types import Receive, Scope, Send

    from xcstack.observability.metrics import HTTP_REQUESTS
    from xcstack.observability.middleware import ObservabilityMiddleware

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        scope["xc.client_disconnected"] = True  # what the gateway's relay sets; no answer is sent

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        raise AssertionError("nothing may be sent to a client that left")

    before = HTTP_REQUESTS.labels("<other>", "POST", "499")._value.get()
    mw = ObservabilityMiddleware(app, max_body_bytes=1024, log_access=False)
    await mw({"type": "http", "method": "POST", "path": "/x", "headers": []}, receive, send)  # type: ignore[arg-type]
    assert HTTP_REQUESTS.labels("<other>", "POST", "499")._value.get() == before + 1
