"""Per-key rate limits: requests/min and tokens/min, local buckets and Redis (two instances)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis

from tests.gateway.conftest import MockUpstream, free_port, upstream
from xcstack.gateway.asgi import key_id
from xcstack.gateway.ratelimit import RateLimiter
from xcstack.gateway.settings import RateLimitSettings

MSG = [{"role": "user", "content": "hi"}]
BODY = {"model": "mock-model", "messages": MSG, "max_tokens": 1}
REDIS = "redis://127.0.0.1:6379/0"


def post(url: str, key: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(url + "/chat/completions", json=body or BODY, headers={"Authorization": f"Bearer {key}"})


def test_requests_per_minute_per_key(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock)], rate_limit={"requests_per_minute": 3})
    assert [post(gw.base_url, "key-a").status_code for _ in range(3)] == [200, 200, 200]
    r = post(gw.base_url, "key-a")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited_requests"
    assert int(r.headers["retry-after"]) >= 1
    assert post(gw.base_url, "key-b").status_code == 200  # another key has its own bucket
    assert mock.stats()["requests"] == 4


def test_tokens_per_minute_estimate_before_and_usage_charged_after(gateway_factory: Any, mock: MockUpstream
                                                                   ) -> None:
    gw = gateway_factory([upstream(mock)], rate_limit={"tokens_per_minute": 1000})
    # tiny prompt (estimate ~1 token) but a 995-token completion: the actual usage is charged after
    assert post(gw.base_url, "k", {**BODY, "max_tokens": 995}).status_code == 200
    r = post(gw.base_url, "k", {**BODY, "messages": [{"role": "user", "content": "x" * 60}]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited_tokens"
    assert "retry-after" in r.headers


def test_streamed_usage_is_charged(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock)], rate_limit={"tokens_per_minute": 1000})
    r = post(gw.base_url, "k", {**BODY, "max_tokens": 995, "stream": True})
    assert r.status_code == 200 and "usage" not in r.text  # client did not ask for usage
    r = post(gw.base_url, "k", {**BODY, "messages": [{"role": "user", "content": "x" * 60}]})
    assert r.status_code == 429


def test_key_identity_prefers_security_principal() -> None:
    hdrs = [(b"authorization", b"Bearer sk-secret")]
    assert key_id({"headers": hdrs}).startswith("k:") and "sk-secret" not in key_id({"headers": hdrs})
    assert key_id({"headers": hdrs, "xc.principal": SimpleNamespace(id="user-42")}) == "user-42"
    assert key_id({"headers": []}) == "anonymous"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"xc:test:gateway:{uuid.uuid4().hex[:8]}:"
    yield prefix
    r = redis.Redis.from_url(REDIS)
    for k in r.scan_iter(prefix + "*"):
        r.delete(k)
    r.close()


def test_two_instances_share_one_limit_through_redis(gateway_factory: Any, mock: MockUpstream,
                                                     redis_prefix: str) -> None:
    limit = 20
    cfg = {"rate_limit": {"requests_per_minute": limit}, "redis_url": REDIS, "redis_prefix": redis_prefix}
    a = gateway_factory([upstream(mock)], **cfg)
    b = gateway_factory([upstream(mock)], **cfg)

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers={"Authorization": "Bearer shared"}) as c:
            rs = await asyncio.gather(*(c.post((a if i % 2 else b).base_url + "/chat/completions", json=BODY)
                                        for i in range(3 * limit)))
        return [r.status_code for r in rs]

    codes = asyncio.run(fire())
    ok = codes.count(200)
    assert set(codes) == {200, 429}
    # each instance alone would admit `limit`; shared, the total stays within the limit (+1 refill slack)
    assert limit - 1 <= ok <= limit + 1, codes
    assert mock.stats()["requests"] == ok


async def test_redis_lua_limiter_tokens_and_charge(redis_prefix: str) -> None:
    rl = RateLimiter(RateLimitSettings(requests_per_minute=0, tokens_per_minute=600), REDIS, redis_prefix)
    try:
        await rl.check("k", 500)
        await rl.charge("k", 200)  # actual usage was 700: bucket in debt
        with pytest.raises(Exception) as ei:
            await rl.check("k", 1)
        assert getattr(ei.value, "code", "") == "rate_limited_tokens"
    finally:
        await rl.close()


async def test_redis_down_falls_back_to_local_buckets() -> None:
    rl = RateLimiter(RateLimitSettings(requests_per_minute=2), f"redis://127.0.0.1:{free_port()}/0", "xc:test:")
    try:
        await rl.check("k", 1)
        await rl.check("k", 1)
        with pytest.raises(Exception) as ei:
            await rl.check("k", 1)
        assert getattr(ei.value, "status", 0) == 429
    finally:
        await rl.close()


def test_requests_refused_by_admission_do_not_count_against_the_key(gateway_factory: Any, mock: MockUpstream
                                                                   ) -> None:
    gw = gateway_factory([upstream(mock)], max_in_flight=1, max_queue=0, rate_limit={"requests_per_minute": 2})

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers={"Authorization": "Bearer k"}) as c:
            slow = asyncio.create_task(c.post(gw.base_url + "/chat/completions",
                                              json={**BODY, "mock": {"ttft_s": 1.5}}))
            await asyncio.sleep(0.3)
            busy = [(await c.post(gw.base_url + "/chat/completions", json=BODY)).status_code for _ in range(3)]
            await slow
            after = (await c.post(gw.base_url + "/chat/completions", json=BODY)).status_code
            return [*busy, after]

    assert asyncio.run(go()) == [503, 503, 503, 200]  # the 503s gave their request back


async def test_redis_refund(redis_prefix: str) -> None:
    rl = RateLimiter(RateLimitSettings(requests_per_minute=1), REDIS, redis_prefix)
    try:
        await rl.check("k", 1)
        await rl.refund("k", 1)
        await rl.check("k", 1)  # the refunded request is available again
        with pytest.raises(Exception):  # noqa: B017
            await rl.check("k", 1)
    finally:
        await rl.close()
