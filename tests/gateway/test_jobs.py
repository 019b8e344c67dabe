"""Async jobs: submit, poll, cancel, TTL, bounded concurrency, and a restart that loses nothing."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.gateway.conftest import GatewayProcess, GatewayServer, MockUpstream, upstream, write_config

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "mock-model", "messages": MSG, "max_tokens": 3}
H = {"Authorization": "Bearer job-owner"}


def submit(base: str, body: dict[str, Any], endpoint: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
    return httpx.post(base + "/jobs", json={"endpoint": endpoint, "body": body, **kw}, headers=H)


def wait_status(base: str, job_id: str, statuses: tuple[str, ...], timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        j = httpx.get(f"{base}/jobs/{job_id}", headers=H).json()
        if j.get("status") in statuses:
            return dict(j)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stuck: {j}")
        time.sleep(0.05)


def test_submit_poll_result(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock)], jobs={"poll_s": 0.1})
    r = submit(gw.base_url, CHAT, metadata={"batch": "b1"})
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] == "queued"
    done = wait_status(gw.base_url, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["http_status"] == 200
    assert done["result"]["choices"][0]["message"]["content"] == "xxx " * 3
    assert done["metadata"] == {"batch": "b1"} and done["expires_at"] > done["finished_at"]
    # other endpoints too
    e = submit(gw.base_url, {"model": "mock-model", "input": ["a"]}, endpoint="/v1/embeddings").json()
    c = submit(gw.base_url, {"model": "mock-model", "prompt": "p", "max_tokens": 2}, endpoint="/v1/completions")
    assert wait_status(gw.base_url, e["id"], ("succeeded",))["result"]["data"][0]["embedding"]
    assert wait_status(gw.base_url, c.json()["id"], ("succeeded",))["result"]["choices"][0]["text"] == "xxx xxx "
    listed = httpx.get(gw.base_url + "/jobs", headers=H).json()["data"]
    assert {j["id"] for j in listed} >= {job["id"], e["id"]}


def test_job_bad_input_and_owner_isolation(gateway: GatewayServer) -> None:
    base = gateway.base_url
    assert httpx.post(base + "/jobs", content=b"{oops", headers=H).json()["error"]["code"] == "invalid_json"
    r = httpx.post(base + "/jobs", json={"endpoint": "/v1/nope", "body": CHAT}, headers=H)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"
    r = submit(base, {"model": "mock-model", "messages": "x"})
    assert r.status_code == 400
    r = submit(base, {**CHAT, "max_tokens": 10**9})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
    r = submit(base, {**CHAT, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    job = submit(base, CHAT).json()
    other = httpx.get(f"{base}/jobs/{job['id']}", headers={"Authorization": "Bearer someone-else"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{base}/jobs/job_missing", headers=H).status_code == 404


def test_cancel_queued_and_running(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock)], jobs={"concurrency": 1, "poll_s": 0.1})
    running = submit(gw.base_url, {**CHAT, "mock": {"ttft_s": 2}}).json()
    queued = submit(gw.base_url, CHAT).json()
    wait_status(gw.base_url, running["id"], ("running",))
    r = httpx.delete(f"{gw.base_url}/jobs/{queued['id']}", headers=H)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    t = time.time()
    assert httpx.delete(f"{gw.base_url}/jobs/{running['id']}", headers=H).json()["status"] == "cancelled"
    for _ in range(100):  # the running job's upstream call is cancelled too
        if mock.stats()["disconnects"]:
            break
        time.sleep(0.02)
    assert mock.stats()["disconnects"] == 1 and mock.stats()["disconnect_events"][-1]["t"] - t < 0.5
    time.sleep(0.3)
    assert mock.stats()["requests"] == 1  # the cancelled queued job never ran
    assert wait_status(gw.base_url, running["id"], ("cancelled",))["error"]["code"] == "cancelled"


def test_ttl_expires_finished_jobs(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock)], jobs={"ttl_s": 0.5, "poll_s": 0.1})
    job = submit(gw.base_url, CHAT).json()
    wait_status(gw.base_url, job["id"], ("succeeded",))
    time.sleep(0.6)
    assert httpx.get(f"{gw.base_url}/jobs/{job['id']}", headers=H).status_code == 404


def test_bounded_job_concurrency_and_queue_limit(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock)], jobs={"concurrency": 2, "max_queued": 3, "poll_s": 0.05})
    slow = {"endpoint": "/v1/chat/completions", "body": {**CHAT, "mock": {"ttft_s": 1.0}}}
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, mock.stats()["in_flight"])
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    try:
        with httpx.Client(headers=H) as c:
            ids = [c.post(gw.base_url + "/jobs", json=slow).json()["id"] for _ in range(3)]
            wait_status(gw.base_url, ids[1], ("running",))
            more = [c.post(gw.base_url + "/jobs", json=slow) for _ in range(4)]
        codes = [r.status_code for r in more]
        assert codes[:2] == [202, 202] and codes[3] == 503, codes  # 1 + 2 queued = 3 = max_queued
        assert more[3].json()["error"]["code"] == "jobs_full" and "retry-after" in more[3].headers
        ids += [r.json()["id"] for r in more if r.status_code == 202]
        for i in ids:
            wait_status(gw.base_url, i, ("succeeded",))
    finally:
        stop.set()
        th.join()
    assert peak == 2


def test_jobs_survive_a_killed_gateway(tmp_path: Path, mock: MockUpstream) -> None:
    cfg = write_config(tmp_path / "gw.toml", tmp_path / "data", {
        "upstreams": [upstream(mock)],
        "jobs": {"concurrency": 1, "lease_s": 1, "poll_s": 0.1},
    })
    gp = GatewayProcess(cfg).start()
    try:
        base = gp.base_url
        finished = submit(base, CHAT).json()
        wait_status(base, finished["id"], ("succeeded",))
        running = submit(base, {**CHAT, "mock": {"ttft_s": 1.0}}).json()
        queued = submit(base, {**CHAT, "max_tokens": 5}).json()
        wait_status(base, running["id"], ("running",))
        gp.kill()  # SIGKILL: no shutdown hook runs
        gp.start()
        assert wait_status(base, finished["id"], ("succeeded",))["result"]["choices"][0]["message"]["content"]
        r = wait_status(base, running["id"], ("succeeded",), timeout=15)  # requeued once its lease expired
        assert r["attempts"] == 2
        q = wait_status(base, queued["id"], ("succeeded",), timeout=15)
        assert q["result"]["usage"]["completion_tokens"] == 5
        # a clean stop requeues the running job at once (no lease wait)
        slow = submit(base, {**CHAT, "mock": {"ttft_s": 5}}).json()
        wait_status(base, slow["id"], ("running",))
        gp.stop()
        with sqlite3.connect(tmp_path / "data" / "state.db") as db:
            row = db.execute("SELECT status, worker FROM gateway_jobs WHERE id = ?", (slow["id"],)).fetchone()
        assert row == ("queued", None)
    finally:
        gp.stop()


def _pg_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True,
                             connect_timeout=2) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'xc_gateway_test'").fetchone():
                conn.execute("CREATE DATABASE xc_gateway_test")
    except Exception:
        return None
    return "postgresql://postgres@127.0.0.1:5432/xc_gateway_test"


def test_jobs_on_postgresql_state_store(tmp_path: Path, mock: MockUpstream) -> None:
    import pytest

    from tests.gateway.conftest import make_settings
    from xcstack.config import StateSettings

    url = _pg_url()
    if url is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 not reachable")
    settings = make_settings(tmp_path, [upstream(mock)], jobs={"poll_s": 0.1})
    settings.state = StateSettings(url=url)  # type: ignore[arg-type]
    gw = GatewayServer(settings).start()
    try:
        job = submit(gw.base_url, CHAT).json()
        assert wait_status(gw.base_url, job["id"], ("succeeded",))["result"]["usage"]["completion_tokens"] == 3
    finally:
        gw.stop()
