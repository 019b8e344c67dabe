"""Async jobs: submit, poll, cancel, TTL, bounded concurrency, and a restart that loses nothing;
each against both job stores (the SQLite state store and Redis), plus the JobStore contract."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.gateway.conftest import GatewayProcess, GatewayServer, MockUpstream, free_port, upstream, write_config
from xcstack.config import ConfigError, load_settings
from xcstack.gateway.jobstore import JobStore, SQLJobStore
from xcstack.gateway.jobstore.redis import RedisJobStore
from xcstack.gateway.settings import JobSettings
from xcstack.state.store import open_store

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "mock-model", "messages": MSG, "max_tokens": 3}
H = {"Authorization": "Bearer job-owner"}
REDIS = "redis://127.0.0.1:6379/0"


def _new_prefix() -> str:
    return f"xc:test:jobs:{uuid.uuid4().hex[:8]}:"


def _drop_prefix(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS)
    for k in r.scan_iter(prefix + "*"):
        r.delete(k)
    r.close()


@dataclass
class Store:
    """The job store a test runs against: "state" (SQLite in the data dir) or "redis" (REDIS under
    a prefix of its own)."""

    kind: str
    prefix: str

    def gateway(self, **jobs: Any) -> dict[str, Any]:
        """`[gateway]` settings (for gateway_factory and write_config) with this store and `jobs`."""
        if self.kind == "state":
            return {"jobs": jobs}
        return {"jobs": {**jobs, "store": "redis"}, "redis_url": REDIS, "redis_prefix": self.prefix}

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}jobs:job:{job_id}"

    def hget(self, job_id: str, *fields: str) -> list[str | None]:
        r = redis.Redis.from_url(REDIS, decode_responses=True)
        try:
            return list(r.hmget(self.job_key(job_id), list(fields)))
        finally:
            r.close()

    def assert_holds(self, data_dir: Path, job_ids: list[str]) -> None:
        """The jobs are where this store keeps them, and only there."""
        with sqlite3.connect(data_dir / "state.db") as db:
            has_table = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'gateway_jobs'").fetchone()
            in_sql = {r[0] for r in db.execute("SELECT id FROM gateway_jobs")} if has_table else set()
        if self.kind == "state":
            assert in_sql >= set(job_ids)
        else:
            assert not in_sql & set(job_ids)
            assert all(self.hget(i, "id") == [i] for i in job_ids)


@pytest.fixture(params=["state", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    s = Store(request.param, _new_prefix())
    yield s
    if s.kind == "redis":
        _drop_prefix(s.prefix)


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


def test_submit_poll_result(gateway_factory: Any, mock: MockUpstream, store: Store, tmp_path: Path) -> None:
    gw = gateway_factory([upstream(mock)], **store.gateway(poll_s=0.1))
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
    assert {j["id"] for j in listed} == {job["id"], e["id"], c.json()["id"]}
    assert [j["created_at"] for j in listed] == sorted((j["created_at"] for j in listed), reverse=True)
    store.assert_holds(tmp_path / "data", [job["id"], e["id"], c.json()["id"]])


def test_job_bad_input_and_owner_isolation(gateway_factory: Any, mock: MockUpstream, store: Store) -> None:
    base = gateway_factory([upstream(mock)], **store.gateway()).base_url
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
    other_h = {"Authorization": "Bearer someone-else"}
    other = httpx.get(f"{base}/jobs/{job['id']}", headers=other_h)
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    other = httpx.delete(f"{base}/jobs/{job['id']}", headers=other_h)  # nor cancel it
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{base}/jobs", headers=other_h).json()["data"] == []
    assert wait_status(base, job["id"], ("succeeded",))["result"]["usage"]["completion_tokens"] == 3
    # a finished job cannot be cancelled: DELETE answers its state, unchanged
    assert httpx.delete(f"{base}/jobs/{job['id']}", headers=H).json()["status"] == "succeeded"
    assert httpx.get(f"{base}/jobs/job_missing", headers=H).status_code == 404
    assert httpx.delete(f"{base}/jobs/job_missing", headers=H).status_code == 404


def test_cancel_queued_and_running(gateway_factory: Any, mock: MockUpstream, store: Store) -> None:
    gw = gateway_factory([upstream(mock)], **store.gateway(concurrency=1, poll_s=0.1))
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
    assert wait_status(gw.base_url, queued["id"], ("cancelled",))["attempts"] == 0


def test_ttl_expires_finished_jobs(gateway_factory: Any, mock: MockUpstream, store: Store) -> None:
    gw = gateway_factory([upstream(mock)], **store.gateway(ttl_s=0.5, poll_s=0.1))
    job = submit(gw.base_url, CHAT).json()
    wait_status(gw.base_url, job["id"], ("succeeded",))
    assert [j["id"] for j in httpx.get(gw.base_url + "/jobs", headers=H).json()["data"]] == [job["id"]]
    time.sleep(0.6)
    assert httpx.get(f"{gw.base_url}/jobs/{job['id']}", headers=H).status_code == 404
    assert httpx.get(gw.base_url + "/jobs", headers=H).json()["data"] == []
    if store.kind == "redis":  # the hash itself is gone (PEXPIREAT), not just hidden
        assert store.hget(job["id"], "id") == [None]


def test_bounded_job_concurrency_and_queue_limit(gateway_factory: Any, mock: MockUpstream, store: Store) -> None:
    gw = gateway_factory([upstream(mock)], **store.gateway(concurrency=2, max_queued=3, poll_s=0.05))
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


def test_jobs_survive_a_killed_gateway(tmp_path: Path, mock: MockUpstream, store: Store) -> None:
    cfg = write_config(tmp_path / "gw.toml", tmp_path / "data", {
        "upstreams": [upstream(mock)], **store.gateway(concurrency=1, lease_s=1, poll_s=0.1),
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
        if store.kind == "state":
            with sqlite3.connect(tmp_path / "data" / "state.db") as db:
                row = db.execute("SELECT status, worker FROM gateway_jobs WHERE id = ?", (slow["id"],)).fetchone()
            assert row == ("queued", None)
        else:
            assert store.hget(slow["id"], "status", "worker") == ["queued", None]
        store.assert_holds(tmp_path / "data", [finished["id"], running["id"], queued["id"], slow["id"]])
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


def test_two_gateways_share_the_redis_job_queue(gateway_factory: Any, mock: MockUpstream) -> None:
    """Two nodes on one Redis: each runs at most its `concurrency`, every job runs exactly once,
    and a job submitted on one node is read and cancelled on the other."""
    store = Store("redis", _new_prefix())
    try:
        cfg = store.gateway(concurrency=1, poll_s=0.05)
        a = gateway_factory([upstream(mock)], **cfg)
        b = gateway_factory([upstream(mock)], **cfg)
        slow = {**CHAT, "mock": {"ttft_s": 0.6}}
        ids = [submit(a.base_url, slow).json()["id"] for _ in range(4)]
        doomed = submit(a.base_url, slow).json()["id"]
        assert httpx.delete(f"{b.base_url}/jobs/{doomed}", headers=H).json()["status"] == "cancelled"
        peak = 0
        deadline = time.monotonic() + 15
        while not all(httpx.get(f"{b.base_url}/jobs/{i}", headers=H).json()["status"] == "succeeded" for i in ids):
            peak = max(peak, mock.stats()["in_flight"])
            assert time.monotonic() < deadline, "jobs did not finish"
            time.sleep(0.05)
        assert peak == 2  # one per node: both nodes took jobs, neither more than its concurrency
        assert mock.stats()["requests"] == 4  # each job ran once; the cancelled one never
        assert {j["id"] for j in httpx.get(b.base_url + "/jobs", headers=H).json()["data"]} == {*ids, doomed}
    finally:
        _drop_prefix(store.prefix)


@pytest.fixture(params=["sql", "redis"])
async def job_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    if request.param == "sql":
        state = open_store(None, tmp_path)
        st: JobStore = SQLJobStore(state)
        await st.start()
        yield st
        await st.close()
        await state.close()
    else:
        prefix = _new_prefix()
        st = RedisJobStore(REDIS, prefix + "jobs:")
        await st.start()
        yield st
        await st.close()
        _drop_prefix(prefix)


async def test_job_store_contract(job_store: JobStore) -> None:
    """Every JobStore behaves the same: queue limit, oldest first, leases, owner checks, expiry."""
    st, now = job_store, time.time()
    for job_id, dt in (("job_b", 1.0), ("job_a", 0.0), ("job_c", 2.0)):  # a is the oldest, submitted second
        assert await st.submit(job_id, "alice", "/v1/chat/completions", '{"n": 1}', '{"m": 1}' if dt else None,
                               now + dt, 3)
    assert not await st.submit("job_d", "alice", "/v1/chat/completions", "{}", None, now + 3, 3)  # 3 queued
    assert await st.get("alice", "job_d", now) is None

    a = await st.claim("w1", now, now + 10)
    assert a is not None and a["id"] == "job_a" and a["status"] == "running" and a["attempts"] == 1
    assert a["worker"] == "w1" and a["lease_until"] == now + 10 and a["started_at"] == now
    assert await st.renew("w1", ["job_a", "job_b"], now + 20) == ["job_b"]  # b is not running
    assert await st.renew("w2", ["job_a"], now + 20) == ["job_a"]  # not w2's
    assert not await st.cancel("mallory", "job_b", '{"error": {}}', now, now + 50)  # owner-checked
    assert await st.cancel("alice", "job_b", '{"error": {"code": "cancelled"}}', now, now + 50)
    assert not await st.cancel("alice", "job_b", "{}", now, now + 50)  # final already
    c = await st.claim("w2", now, now + 5)  # b is cancelled: c is next
    assert c is not None and c["id"] == "job_c" and await st.claim("w2", now, now + 5) is None

    assert not await st.finish("w2", "job_a", "succeeded", 200, "{}", None, now, now + 100)  # not w2's
    assert await st.finish("w1", "job_a", "succeeded", 200, '{"x": 1}', None, now + 1, now + 100)
    assert not await st.finish("w1", "job_a", "failed", 500, None, "{}", now + 2, now + 100)
    assert not await st.cancel("alice", "job_a", "{}", now, now + 50)  # finished: not cancellable
    assert await st.renew("w1", ["job_a"], now + 20) == ["job_a"]
    got = await st.get("alice", "job_a", now + 2)
    assert got is not None and got["status"] == "succeeded" and got["http_status"] == 200
    assert got["result"] == '{"x": 1}' and got["error"] is None and got["metadata"] is None
    assert got["finished_at"] == now + 1 and got["expires_at"] == now + 100 and got["lease_until"] is None
    assert await st.get("mallory", "job_a", now) is None and await st.get("alice", "job_a", now + 101) is None
    b = await st.get("alice", "job_b", now)
    assert b is not None and b["status"] == "cancelled" and b["error"] == '{"error": {"code": "cancelled"}}'
    assert b["metadata"] == '{"m": 1}' and b["attempts"] == 0

    assert [j["id"] for j in await st.list_owned("alice", now, 10)] == ["job_c", "job_b", "job_a"]
    assert [j["id"] for j in await st.list_owned("alice", now, 2)] == ["job_c", "job_b"]
    assert [j["id"] for j in await st.list_owned("alice", now + 60, 10)] == ["job_c", "job_a"]  # b expired
    assert await st.list_owned("mallory", now, 10) == []

    # c's worker goes silent: its lease ends at now + 5, then it is requeued and claimed again
    await st.maintain(now + 4, False)
    assert (await st.get("alice", "job_c", now))["status"] == "running"  # type: ignore[index]
    await st.maintain(now + 6, False)
    c = await st.get("alice", "job_c", now)
    assert c is not None and c["status"] == "queued" and c["worker"] is None and c["lease_until"] is None
    assert await st.renew("w2", ["job_c"], now + 30) == ["job_c"]  # w2 learns it lost the job
    c = await st.claim("w3", now + 7, now + 17)
    assert c is not None and c["id"] == "job_c" and c["attempts"] == 2 and c["worker"] == "w3"
    await st.requeue("w2", ["job_c"])  # not w2's: nothing happens
    assert (await st.get("alice", "job_c", now))["status"] == "running"  # type: ignore[index]
    await st.requeue("w3", ["job_c"])
    assert (await st.get("alice", "job_c", now))["status"] == "queued"  # type: ignore[index]
    assert (await st.claim("w4", now + 8, now + 18))["id"] == "job_c"  # type: ignore[index]

    # the sweep deletes what expired (a, b) and keeps the rest (c: its lease ended, so it is queued again)
    await st.maintain(now + 60, True)
    assert await st.get("alice", "job_b", now) is None and await st.get("alice", "job_a", now) is not None
    assert (await st.get("alice", "job_c", now))["status"] == "queued"  # type: ignore[index]
    await st.maintain(now + 101, True)
    assert await st.get("alice", "job_a", now) is None
    assert [j["id"] for j in await st.list_owned("alice", now, 10)] == ["job_c"]
    if isinstance(st, RedisJobStore):  # the indexes hold nothing that is gone
        r = st.redis
        assert await r.zrange(st.prefix + "owner:alice", 0, -1) == ["job_c"]
        assert await r.zcard(st.prefix + "expiring") == 0 and await r.zcard(st.prefix + "running") == 0
        assert await r.zrange(st.prefix + "queued", 0, -1) == ["job_c"]
        assert not await r.exists(st.prefix + "job:job_a", st.prefix + "job:job_b")


def test_redis_job_store_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[gateway.jobs]\nstore = "redis"\n')
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    msg = str(ei.value)
    assert "gateway.jobs.store" in msg and "needs gateway.redis_url" in msg, msg
    cfg.write_text('[gateway.jobs]\nstore = "mongo"\n')
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    assert "gateway.jobs.store" in str(ei.value) and "'state' or 'redis'" in str(ei.value), str(ei.value)
    cfg.write_text(f'[gateway]\nredis_url = "{REDIS}"\nredis_prefix = "xc:a:"\n[gateway.jobs]\nstore = "redis"\n')
    s = load_settings(cfg)
    assert s.gateway.jobs.store == "redis" and s.gateway.redis_prefix == "xc:a:"
    assert JobSettings().store == "state"  # the default


def test_redis_job_store_down_answers_503(gateway_factory: Any, mock: MockUpstream) -> None:
    """Redis unreachable: the gateway still starts; job calls fail fast with a retriable 503."""
    gw = gateway_factory([upstream(mock)], jobs={"store": "redis", "poll_s": 0.1},
                         redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for r in (submit(gw.base_url, CHAT), httpx.get(gw.base_url + "/jobs/job_x", headers=H),
              httpx.get(gw.base_url + "/jobs", headers=H)):
        assert r.status_code == 503 and r.json()["error"]["code"] == "jobs_store_unavailable", r.text
        assert "retry-after" in r.headers
    assert httpx.post(gw.base_url + "/chat/completions", json=CHAT, headers=H).status_code == 200


def test_an_upstream_answer_that_is_not_json_fails_the_job_instead_of_a_500(gateway_factory: Any) -> None:
    """A (misbehaving) upstream that answers 200 with plain text: the job fails with 502 upstream_error,
    and polling it stays a 200 with the documented shape (it was a 500 when the result was parsed)."""
    import asyncio

    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        return web.Response(text="not json at all", content_type="text/plain")

    port = free_port()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        gw = gateway_factory([{"name": "plain", "base_url": f"http://127.0.0.1:{port}/v1", "models": ["mock-model"]}],
                             jobs={"poll_s": 0.1})
        job = submit(gw.base_url, CHAT).json()
        done = wait_status(gw.base_url, job["id"], ("succeeded", "failed"))
        assert done["status"] == "failed" and done["http_status"] == 502 and done["result"] is None
        assert done["error"]["code"] == "upstream_error"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
