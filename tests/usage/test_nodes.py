"""Two gateway nodes sharing Redis (quota counters) and PostgreSQL (state store, ledger) enforce one
hard quota together; Redis down follows `on_counter_failure`."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import MockUpstream
from tests.usage.conftest import governed, login, setup_users, unique_prefix

MSG = [{"role": "user", "content": "hi"}]


def chat(url: str, h: dict[str, str]) -> int:
    return httpx.post(url + "/v1/chat/completions", headers=h, timeout=20,
                      json={"model": "mock-model", "messages": MSG, "max_tokens": 4}).status_code


def test_two_nodes_share_one_hard_quota(tmp_path: Path, mock: MockUpstream, pg_url: str, redis_url: str) -> None:
    # a loaded test machine: a generous Redis timeout, so that no call falls back to per-node counters
    usage: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": unique_prefix(), "redis_timeout_s": 3.0,
                             "quotas": [
        {"scope": "group", "subject": "team", "metric": "requests", "period": "day", "limit": 20},
        {"scope": "group", "subject": "team", "metric": "output_tokens", "period": "day", "limit": 10_000}]}
    mock.configure(ttft_s=0.05)  # calls overlap
    a = governed(tmp_path / "a", mock, usage, state_url=pg_url)
    b = governed(tmp_path / "b", mock, usage, state_url=pg_url)
    try:
        setup_users(a, {"u1": (["llm-user"], "team"), "u2": (["llm-user"], "team")})
        ha, hb = login(a, "u1"), login(b, "u2")
        assert a.app is not b.app and a.cap("usage").service.quotas is not b.cap("usage").service.quotas
        jobs = [(a.url, ha) if i % 2 else (b.url, hb) for i in range(64)]
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(lambda j: chat(*j), jobs))
        served = codes.count(200)
        assert codes.count(429) == 64 - served
        assert 20 <= served <= 20 + 2, codes  # overshoot <= one request per node (requests: exact)
        assert served == 20
        # both ledgers (one PostgreSQL) hold every call (a record is written just after its answer: poll)
        deadline = time.monotonic() + 10
        while True:
            rows = a.call(lambda: a.cap("usage").service.store.fetchall(
                "SELECT status, COUNT(*) AS n FROM usage_records GROUP BY status"))
            got = {int(r["status"]): int(r["n"]) for r in rows}
            if got == {200: 20, 429: 44} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got == {200: 20, 429: 44}
    finally:
        mock.reset()
        a.stop()
        b.stop()


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_down_follows_on_counter_failure(tmp_path: Path, mock: MockUpstream, policy: str) -> None:
    usage = {"redis_url": "redis://127.0.0.1:1/0", "redis_timeout_s": 0.2, "on_counter_failure": policy,
             "quotas": [{"scope": "group", "subject": "team", "metric": "requests", "period": "day", "limit": 2}]}
    gw = governed(tmp_path, mock, usage)
    try:
        setup_users(gw, {"u1": (["llm-user"], "team"), "free": (["llm-user"], None)})
        h = login(gw, "u1")
        codes = [chat(gw.url, h) for _ in range(3)]
        if policy == "open":  # per-node counters decide: the quota still holds on this node
            assert codes == [200, 200, 429]
        else:
            assert codes == [503, 503, 503]
            r = httpx.post(gw.url + "/v1/chat/completions", headers=h, json={
                "model": "mock-model", "messages": MSG, "max_tokens": 1})
            assert r.json()["error"]["code"] == "quota_counters_unavailable" and r.headers["retry-after"]
        assert chat(gw.url, login(gw, "free")) == 200  # no quota applies: Redis is never asked
    finally:
        gw.stop()
