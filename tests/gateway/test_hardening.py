"""Gateway hardening (issue 12): departed clients leave the admission queue, a silent Redis cannot stall
the node (breaker around the shared rate limiter), strict request types, empty embedding input refused,
and embeddings without `model` authorized against the configured default model."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, free_port, make_settings, upstream

MSG = [{"role": "user", "content": "hi"}]
BODY = {"model": "mock-model", "messages": MSG, "max_tokens": 2}
REDIS_PORT = 6379


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _wait(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - t0


def _raw_request(port: int, body: dict[str, Any]) -> socket.socket:
    """An HTTP request sent whole on a raw socket (closed later by the caller: a client that hangs up)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


# -- finding 13: departed clients and the admission queue ---------------------------------------------------

def test_clients_that_hang_up_while_queued_leave_the_queue_and_never_reach_the_upstream(
        gateway_factory: Any, mock: MockUpstream) -> None:
    """The global gate is per worker (an in-process Gate, not shared through Redis): one node shows it."""
    gw = gateway_factory([upstream(mock)], max_in_flight=2, max_queue=3, queue_timeout_s=5)
    before_gone = _sample("xc_gateway_client_disconnects_total", endpoint="chat")
    before_499 = _sample("xc_gateway_requests_total", endpoint="chat", model="-", status="499")

    async def go() -> tuple[list[int], int, float]:
        async with aiohttp.ClientSession() as s:
            async def call(body: dict[str, Any]) -> int:
                async with s.post(gw.base_url + "/chat/completions", json=body) as r:
                    await r.read()
                    return r.status

            busy = [asyncio.create_task(call({**BODY, "mock": {"ttft_s": 1.0}})) for _ in range(2)]
            await asyncio.to_thread(_wait, lambda: gw.service.gate.active == 2, 5, "2 busy slots")
            # three clients queue (one streamed) and hang up while queued
            socks = [_raw_request(gw.port, {**BODY, "stream": i == 0, "messages": [{"role": "user",
                                                                                    "content": "departed"}]})
                     for i in range(3)]
            await asyncio.to_thread(_wait, lambda: gw.service.gate.waiting == 3, 5, "3 queued")
            for sk in socks:
                sk.close()
            left = await asyncio.to_thread(_wait, lambda: gw.service.gate.waiting == 0, 0.5, "the queue to empty")
            # the queue is free again: a live client waits for a slot and is served (it got 503 at once before)
            live = await call(BODY)
            return [*(await asyncio.gather(*busy)), live], gw.service.gate.waiting, left

    statuses, _, left = asyncio.run(go())
    assert statuses == [200, 200, 200], statuses
    assert left < 0.5  # they left at once, not when a slot or the queue timeout came
    assert gw.wait_idle(5) == 0
    # no upstream call for a departed client: the two busy ones and the live one only
    assert mock.stats()["requests"] == 3
    assert _sample("xc_gateway_client_disconnects_total", endpoint="chat") - before_gone == 3
    assert _sample("xc_gateway_requests_total", endpoint="chat", model="-", status="499") - before_499 == 3


# -- finding 15: a silent Redis behind the shared rate limiter --------------------------------------------

class FlakyRedis:
    """What `redis_url` points to: `silent` accepts connections and never answers (a hung Redis); otherwise
    it forwards to the real Redis (Redis back). An asyncio server on its own thread and loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.silent = True
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self.thread = threading.Thread(target=self._run, daemon=True, name="flaky-redis")

    def _run(self) -> None:
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            for task in self._clients:
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if self.silent:
                while await reader.read(65536):
                    pass
                return
            up_r, up_w = await asyncio.open_connection("127.0.0.1", REDIS_PORT)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)
        except OSError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    def start(self) -> FlakyRedis:
        self.thread.start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)


@pytest.fixture
def flaky_redis() -> Iterator[FlakyRedis]:
    fr = FlakyRedis().start()
    yield fr
    fr.stop()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at_least(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


def _readyz(gw: GatewayServer) -> tuple[int, str]:
    r = httpx.get(gw.url + "/readyz")
    return r.status_code, str(r.json()["checks"]["gateway"].get("detail", ""))


def test_silent_redis_opens_the_limiter_breaker_requests_stay_fast_and_it_closes_when_redis_is_back(
        gateway_factory: Any, mock: MockUpstream, flaky_redis: FlakyRedis) -> None:
    prefix = f"xc:test:hardening:{uuid.uuid4().hex[:8]}:"
    gw = gateway_factory(
        [upstream(mock)], redis_url=f"redis://127.0.0.1:{flaky_redis.port}/0", redis_prefix=prefix,
        rate_limit={"requests_per_minute": 1_000_000, "redis_timeout_s": 0.2, "redis_max_pending": 4,
                    "redis_breaker": {"failure_threshold": 3, "open_s": 1.5}},
    )
    records = _Records()
    logger = logging.getLogger("xcstack.gateway.ratelimit")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async def burst(n: int) -> list[tuple[int, float]]:
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer k1"}) as s:
                async def one() -> tuple[int, float]:
                    t = time.monotonic()
                    async with s.post(gw.base_url + "/chat/completions", json=BODY) as r:
                        await r.read()
                        return r.status, time.monotonic() - t

                return await asyncio.gather(*(one() for _ in range(n)))

        # a burst while Redis is silent: at most redis_max_pending requests wait for Redis (each at most the
        # timeout); the rest are decided by the local buckets at once; none fails
        first = asyncio.run(burst(24))
        assert [st for st, _ in first] == [200] * 24
        waited = [t for _, t in first if t >= 0.15]
        assert 1 <= len(waited) <= 4, sorted(t for _, t in first)
        assert max(t for _, t in first) < 1.0
        assert gw.service.limiter.breaker.state_name == "open"
        assert REGISTRY.get_sample_value("xc_gateway_rate_limit_breaker_state") == 1

        # breaker open: no request waits for Redis
        lat = []
        with httpx.Client(headers={"Authorization": "Bearer k1"}) as c:
            for _ in range(60):
                t = time.monotonic()
                assert c.post(gw.base_url + "/chat/completions", json=BODY).status_code == 200
                lat.append(time.monotonic() - t)
        assert statistics.median(lat) < 0.05, lat
        assert sum(t >= 0.15 for t in lat) <= 1, lat  # at most one half-open probe, if open_s ran out
        status, detail = _readyz(gw)
        assert status == 200 and "shared rate limiter degraded" in detail  # the node still serves: ready
        warnings = records.at_least(logging.WARNING)
        assert len(warnings) == 1 and "degraded" in warnings[0], warnings  # one line, not one per request
        assert len(records.at_least(logging.INFO)) <= 2

        # Redis back: the next call after open_s is a probe that closes the breaker
        flaky_redis.silent = False
        time.sleep(1.6)
        assert httpx.post(gw.base_url + "/chat/completions", json=BODY,
                          headers={"Authorization": "Bearer k1"}).status_code == 200
        assert gw.service.limiter.breaker.state_name == "closed"
        assert REGISTRY.get_sample_value("xc_gateway_rate_limit_breaker_state") == 0
        status, detail = _readyz(gw)
        assert status == 200 and "degraded" not in detail
        assert "recovered" in records.at_least(logging.WARNING)[-1]
        r = redis.Redis(port=REDIS_PORT)
        try:
            assert list(r.scan_iter(prefix + "rl:*"))  # the shared buckets are in use again
            for k in r.scan_iter(prefix + "*"):
                r.delete(k)
        finally:
            r.close()
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)


def test_readyz_probe_notices_redis_back_without_traffic(gateway_factory: Any, mock: MockUpstream,
                                                        flaky_redis: FlakyRedis) -> None:
    gw = gateway_factory(
        [upstream(mock)], redis_url=f"redis://127.0.0.1:{flaky_redis.port}/0",
        rate_limit={"requests_per_minute": 1_000_000, "redis_timeout_s": 0.1,
                    "redis_breaker": {"failure_threshold": 1, "open_s": 0.3}},
    )
    assert httpx.post(gw.base_url + "/chat/completions", json=BODY).status_code == 200
    assert "degraded" in _readyz(gw)[1]
    flaky_redis.silent = False
    time.sleep(0.35)
    status, detail = _readyz(gw)  # the due probe is a PING
    assert status == 200 and "degraded" not in detail, detail


# -- finding 11: loose types, empty input, embeddings without a model ---------------------------------------

@pytest.mark.parametrize(("path", "body", "param"), [
    ("/chat/completions", {**BODY, "stream": "yes"}, "stream"),
    ("/chat/completions", {**BODY, "stream": 1}, "stream"),
    ("/chat/completions", {**BODY, "max_tokens": True}, "max_tokens"),
    ("/chat/completions", {**BODY, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ("/completions", {"model": "mock-model", "prompt": "x", "echo": 1}, "echo"),
    ("/embeddings", {"model": "mock-model", "input": "x", "dimensions": True}, "dimensions"),
    ("/embeddings", {"model": "mock-model", "input": ""}, "input"),
    ("/embeddings", {"model": "mock-model", "input": []}, "input"),
    ("/embeddings", {"model": "mock-model", "input": [""]}, "input[0]"),
    ("/embeddings", {"model": "mock-model", "input": ["a", "b", ""]}, "input[2]"),
    ("/embeddings", {"model": "mock-model", "input": [[1, 2], []]}, "input[1]"),
])
def test_strict_types_and_empty_embedding_input_are_400(gateway: GatewayServer, mock: MockUpstream, path: str,
                                                        body: dict[str, Any], param: str) -> None:
    r = httpx.post(gateway.base_url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_parameter" and err["param"] == param, err
    assert mock.stats()["requests"] == 0


def test_embeddings_without_model_and_no_default_served_is_model_required(gateway: GatewayServer,
                                                                           mock: MockUpstream) -> None:
    r = httpx.post(gateway.base_url + "/embeddings", json={"input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_required", r.text
    assert r.json()["error"]["param"] == "model"


def test_embeddings_without_model_go_to_the_default_model_upstream(tmp_path: Path, mock: MockUpstream) -> None:
    settings = make_settings(tmp_path, [upstream(mock)])
    settings.inference.default_embedding_model = "mock-model"  # served by the upstream
    gw = GatewayServer(settings, [GATEWAY_CAP]).start()
    try:
        r = httpx.post(gw.base_url + "/embeddings", json={"input": "x"})
        assert r.status_code == 200, r.text
        assert mock.last()["body"]["model"] == "mock-model"  # filled in, also in what the upstream got
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.inference.conftest import default_model_repo

    return default_model_repo(tmp_path_factory)


def test_embeddings_without_model_are_authorized_against_the_default_model(tmp_path: Path, mock: MockUpstream,
                                                                           model_repo: Path) -> None:
    """Security + gateway + the real inference capability (inline): a key allowed to invoke only the default
    embedding model may omit `model` (it used to be checked against `model:`, the empty name: 403)."""
    from xcstack.inference.settings import InferenceSettings
    from xcstack.security.service import SYSTEM
    from xcstack.security.settings import SecuritySettings

    settings = make_settings(tmp_path, [upstream(mock)])
    settings.security = SecuritySettings.model_validate({"pbkdf2_iterations": 100_000})
    settings.inference = InferenceSettings.model_validate({"mode": "inline", "model_repository": str(model_repo)})
    default = settings.inference.default_embedding_model
    gw = GatewayServer(settings, ["xcstack.security.capability", GATEWAY_CAP, "xcstack.inference.capability"])
    gw.start()
    try:
        svc = gw.cap("security").service

        async def setup() -> None:
            await svc.create_role(SYSTEM, "emb", [("route:/v1/*", "*"), (f"model:{default}", "invoke")])
            await svc.create_user(SYSTEM, "emb-app", ["emb"], kind="service", password="Gateway-Pass-2024!")

        gw.call(setup)
        token = httpx.post(gw.url + "/v1/auth/login", json={"username": "emb-app",
                                                             "password": "Gateway-Pass-2024!"}).json()["token"]
        h = {"Authorization": f"Bearer {token}"}
        r = httpx.post(gw.base_url + "/embeddings", json={"input": ["hello"]}, headers=h, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == default and len(r.json()["data"][0]["embedding"]) == 384
        # another model is still refused, and an empty text is refused by the gateway, naming the index
        r = httpx.post(gw.base_url + "/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"}, headers=h)
        assert r.status_code == 403, r.text
        r = httpx.post(gw.base_url + "/embeddings", json={"input": ["ok", ""]}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]", r.text
    finally:
        gw.stop()


async def test_the_model_check_fails_closed_without_an_authorizer() -> None:
    """The gateway asks the model permission always: a scope without an authorizer is an error, never a pass
    (it returned silently before, so a wiring mistake would have skipped every model check)."""
    from xcstack.gateway.service import GatewayService

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    with pytest.raises(Exception) as info:
        await GatewayService._authorize(None, scope, receive, "mock-model")  # type: ignore[arg-type]
    assert "authorizer" in str(info.value).lower()
