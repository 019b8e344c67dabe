"""Routing, failover before the first byte, breaker, mid-stream faults, readiness."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import GatewayServer, MockUpstream, free_port, upstream

MSG = [{"role": "user", "content": "hi"}]
BODY = {"model": "mock-model", "messages": MSG, "max_tokens": 2}


def three(mocks: list[MockUpstream], **kw: Any) -> list[dict[str, Any]]:
    return [upstream(m, weight=w) for m, w in zip(mocks, (3, 2, 1), strict=True)]


def reqs(mocks: list[MockUpstream]) -> list[int]:
    return [m.stats()["requests"] for m in mocks]


def test_least_in_flight_weighted_spreads_by_weight(gateway_factory: Any, mocks: list[MockUpstream],
                                                    mock: MockUpstream) -> None:
    for m in mocks:
        m.configure(ttft_s=0.2)
    gw = gateway_factory(three(mocks))

    async def burst() -> None:
        import asyncio

        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as c:
            rs = await asyncio.gather(*(c.post(gw.base_url + "/chat/completions", json=BODY) for _ in range(60)))
        assert all(r.status_code == 200 for r in rs)

    import asyncio

    asyncio.run(burst())
    counts = reqs(mocks)
    assert sum(counts) == 60
    # concurrent requests spread in proportion to weight (3:2:1 → 30/20/10), within slack
    assert counts[0] > counts[1] > counts[2] > 0, counts


def test_failover_order_and_bounded_attempts(gateway_factory: Any, mocks: list[MockUpstream], mock: MockUpstream
                                             ) -> None:
    mocks[0].configure(fault="500")
    mocks[1].configure(fault="500")
    gw = gateway_factory(three(mocks), retry={"max_attempts": 3, "backoff_base_s": 0.001})
    r = httpx.post(gw.base_url + "/chat/completions", json=BODY)
    assert r.status_code == 200
    assert reqs(mocks) == [1, 1, 1]  # weight order: m0, then m1, then m2 (which answered)

    gw2 = gateway_factory(three(mocks), retry={"max_attempts": 2, "backoff_base_s": 0.001})
    r = httpx.post(gw2.base_url + "/chat/completions", json=BODY)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert reqs(mocks) == [2, 2, 1]  # m2 not tried: attempts are bounded


@pytest.mark.parametrize("fault", ["429", "reset"])
def test_failover_on_429_and_connection_reset(gateway_factory: Any, mocks: list[MockUpstream], mock: MockUpstream,
                                              fault: str) -> None:
    mocks[0].configure(fault=fault)
    gw = gateway_factory(three(mocks)[:2], retry={"backoff_base_s": 0.001})
    r = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0).chat.completions.create(**BODY)
    assert r.choices[0].message.content
    assert mocks[0].stats()["faults"] == 1 and mocks[1].stats()["requests"] == 1


def test_all_upstreams_429_gives_503_with_retry_after(gateway_factory: Any, mocks: list[MockUpstream],
                                                      mock: MockUpstream) -> None:
    mocks[0].configure(fault="429")
    mocks[1].configure(fault="429")
    gw = gateway_factory(three(mocks)[:2], retry={"backoff_base_s": 0.001})
    r = httpx.post(gw.base_url + "/chat/completions", json=BODY)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "upstream_unavailable"


def test_upstream_down_fails_over_then_503_quickly(gateway_factory: Any, mock: MockUpstream) -> None:
    dead = [{"name": f"dead{i}", "base_url": f"http://127.0.0.1:{free_port()}/v1", "models": ["mock-model"]}
            for i in range(2)]
    gw = gateway_factory(dead, retry={"backoff_base_s": 0.001})
    t = time.monotonic()
    r = httpx.post(gw.base_url + "/chat/completions", json=BODY, timeout=10)
    assert time.monotonic() - t < 1.0
    assert r.status_code == 503 and "retry-after" in r.headers
    assert r.json()["error"]["code"] == "upstream_unavailable"
    # with one live upstream among dead ones, the request succeeds
    gw2 = gateway_factory([*dead, upstream(mock, weight=0.01)], retry={"backoff_base_s": 0.001})
    assert httpx.post(gw2.base_url + "/chat/completions", json=BODY).status_code == 200


def test_ttfb_timeout_fails_over(gateway_factory: Any, mocks: list[MockUpstream], mock: MockUpstream) -> None:
    mocks[0].configure(fault="stall_headers")
    gw = gateway_factory([upstream(mocks[0], weight=5, timeouts={"ttfb_s": 0.3}), upstream(mocks[1])],
                         retry={"backoff_base_s": 0.001})
    t = time.monotonic()
    r = httpx.post(gw.base_url + "/chat/completions", json={**BODY, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert 0.25 < time.monotonic() - t < 2
    assert mocks[1].stats()["requests"] == 1


def test_no_retry_after_bytes_streamed_error_event_then_done(gateway_factory: Any, mocks: list[MockUpstream],
                                                             mock: MockUpstream) -> None:
    mocks[0].configure(fault="reset_mid", fault_after=3)
    gw = gateway_factory([upstream(mocks[0], weight=5), upstream(mocks[1])])
    r = httpx.post(gw.base_url + "/chat/completions", json={**BODY, "max_tokens": 10, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "stream_interrupted" in events[-2]
    assert sum('"content":"xxx "' in e for e in events) == 3
    assert mocks[1].stats()["requests"] == 0  # never retried after bytes reached the client
    assert gw.wait_idle() == 0

    # the SDK surfaces the error event as an exception after the chunks
    c = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)
    mocks[0].configure(fault="reset_mid", fault_after=2)
    got = []
    with pytest.raises(openai.APIError):
        for ch in c.chat.completions.create(**{**BODY, "max_tokens": 10}, stream=True):
            got.append(ch)
    assert len(got) >= 2


def test_stalled_upstream_mid_stream_gives_timeout_event(gateway_factory: Any, mock: MockUpstream) -> None:
    mock.configure(fault="stall", fault_after=2)
    gw = gateway_factory([upstream(mock, timeouts={"idle_s": 0.3})])
    t = time.monotonic()
    r = httpx.post(gw.base_url + "/chat/completions", json={**BODY, "max_tokens": 10, "stream": True})
    assert time.monotonic() - t < 3
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and "upstream_timeout" in events[-2]
    assert gw.wait_idle() == 0
    assert mock.stats()["disconnects"] == 1  # the stalled upstream connection was closed


def test_total_timeout_non_stream(gateway_factory: Any, mock: MockUpstream) -> None:
    mock.configure(ttft_s=5)
    gw = gateway_factory([upstream(mock, timeouts={"total_s": 0.4, "connect_s": 0.2})])
    t = time.monotonic()
    r = httpx.post(gw.base_url + "/chat/completions", json=BODY)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t < 2
    assert gw.wait_idle() == 0


def test_breaker_opens_skips_upstream_and_half_open_probe_recovers(gateway_factory: Any, mocks: list[MockUpstream],
                                                                   mock: MockUpstream) -> None:
    mocks[0].configure(fault="500")
    gw = gateway_factory([upstream(mocks[0], weight=10), upstream(mocks[1])],
                         breaker={"failure_threshold": 2, "open_s": 0.5}, retry={"backoff_base_s": 0.001})
    for _ in range(2):
        assert httpx.post(gw.base_url + "/chat/completions", json=BODY).status_code == 200
    assert mocks[0].stats()["requests"] == 2
    up0 = gw.service.upstreams[0]
    assert up0.breaker.state_name == "open"
    for _ in range(5):  # open: m0 is not tried at all
        assert httpx.post(gw.base_url + "/chat/completions", json=BODY).status_code == 200
    assert mocks[0].stats()["requests"] == 2
    time.sleep(0.6)
    mocks[0].configure(fault="")
    assert httpx.post(gw.base_url + "/chat/completions", json=BODY).status_code == 200  # the half-open probe
    assert mocks[0].stats()["requests"] == 3
    assert up0.breaker.state_name == "closed"


def test_breaker_half_open_failure_reopens(gateway_factory: Any, mock: MockUpstream) -> None:
    mock.configure(fault="500")
    gw = gateway_factory([upstream(mock)], breaker={"failure_threshold": 1, "open_s": 0.3})
    assert httpx.post(gw.base_url + "/chat/completions", json=BODY).status_code == 502
    r = httpx.post(gw.base_url + "/chat/completions", json=BODY)
    assert r.status_code == 503 and "retry-after" in r.headers  # open: refused at once
    assert mock.stats()["requests"] == 1
    time.sleep(0.35)
    assert httpx.post(gw.base_url + "/chat/completions", json=BODY).status_code == 502  # probe fails
    assert gw.service.upstreams[0].breaker.state_name == "open"


def test_readyz_reflects_upstream_health(gateway_factory: Any, mock: MockUpstream) -> None:
    mock.configure(fault="500")
    gw: GatewayServer = gateway_factory([upstream(mock)], breaker={"failure_threshold": 1, "open_s": 30})
    assert httpx.get(gw.url + "/readyz").status_code == 200
    httpx.post(gw.base_url + "/chat/completions", json=BODY)
    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 503
    assert "mock-model" in r.json()["checks"]["gateway"]["detail"]


def test_upstream_process_killed_mid_stream(gateway_factory: Any, mock: MockUpstream) -> None:
    victim = MockUpstream("victim")
    try:
        gw = gateway_factory([upstream(victim)])
        with httpx.stream("POST", gw.base_url + "/chat/completions",
                          json={**BODY, "max_tokens": 1000, "stream": True, "mock": {"tokens_per_s": 50}}) as r:
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(4)]
            assert any("xxx" in s for s in seen)
            victim.proc.kill()  # SIGKILL the upstream while it streams
            rest = list(lines)
        events = [s for s in rest if s.startswith("data:")]
        assert events[-1] == "data: [DONE]" and "stream_interrupted" in events[-2]
        assert gw.wait_idle() == 0
        # and with the only upstream dead, new requests fail fast with 503
        t = time.monotonic()
        r2 = httpx.post(gw.base_url + "/chat/completions", json=BODY)
        assert r2.status_code == 503 and time.monotonic() - t < 1
    finally:
        victim.stop()
