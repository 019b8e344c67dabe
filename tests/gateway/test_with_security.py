"""The gateway behind the real security capability: API keys, per-model RBAC, rate limits keyed by
the principal, streaming and disconnects through the security/audit middleware."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, make_settings, upstream
from tests.gateway.test_stream import _disconnect_trial

MSG = [{"role": "user", "content": "hi"}]
PW = "Gateway-Pass-2024!"


@pytest.fixture
def secured(tmp_path: Path, mock: MockUpstream) -> Iterator[tuple[GatewayServer, str, str]]:
    from xcstack.security.service import SYSTEM
    from xcstack.security.settings import SecuritySettings

    settings = make_settings(tmp_path, [upstream(mock)], rate_limit={"requests_per_minute": 3})
    settings.security = SecuritySettings.model_validate({"pbkdf2_iterations": 100_000})
    gw = GatewayServer(settings, ["xcstack.security.capability", GATEWAY_CAP]).start()
    svc = gw.cap("security").service

    async def setup() -> None:
        await svc.create_role(SYSTEM, "llm-user", [("route:/v1/*", "*"), ("model:mock-model", "invoke")])
        for name in ("app-a", "app-b"):
            await svc.create_user(SYSTEM, name, ["llm-user"], kind="service", password=PW)

    gw.call(setup)
    ta, tb = (httpx.post(gw.url + "/v1/auth/login", json={"username": n, "password": PW}).json()["token"]
              for n in ("app-a", "app-b"))
    try:
        yield gw, ta, tb
    finally:
        gw.stop()


def test_api_key_model_rbac_and_principal_rate_limit(secured: tuple[GatewayServer, str, str]) -> None:
    gw, ta, tb = secured
    assert httpx.post(gw.base_url + "/chat/completions", json={"model": "mock-model", "messages": MSG}
                      ).status_code == 401
    ca = openai.OpenAI(base_url=gw.base_url, api_key=ta, max_retries=0)
    assert ca.chat.completions.create(model="mock-model", messages=MSG, max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError):  # the role may not invoke other-model
        ca.chat.completions.create(model="other-model", messages=MSG, max_tokens=2)
    # nor learn which models exist: a model nobody serves is the same 403, for calls and for jobs
    with pytest.raises(openai.PermissionDeniedError):
        ca.chat.completions.create(model="no-such-model", messages=MSG, max_tokens=2)
    h = {"Authorization": f"Bearer {ta}"}
    for model in ("other-model", "no-such-model"):
        r = httpx.post(gw.url + "/v1/jobs", headers=h, json={"endpoint": "/v1/chat/completions", "body": {
            "model": model, "messages": MSG, "max_tokens": 1}})
        assert r.status_code == 403, (model, r.text)
    text = "".join(c.choices[0].delta.content or "" for c in ca.chat.completions.create(
        model="mock-model", messages=MSG, max_tokens=3, stream=True) if c.choices)
    assert text == "xxx " * 3
    with pytest.raises(openai.RateLimitError):  # 3 per minute for this principal
        for _ in range(3):
            ca.chat.completions.create(model="mock-model", messages=MSG, max_tokens=1)
    cb = openai.OpenAI(base_url=gw.base_url, api_key=tb, max_retries=0)
    assert cb.chat.completions.create(model="mock-model", messages=MSG, max_tokens=1).choices
    metrics = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ta}"}).text
    assert ta not in metrics and tb not in metrics


async def test_disconnect_through_security_middleware(secured: tuple[GatewayServer, str, str],
                                                      mock: MockUpstream) -> None:
    gw, ta, _ = secured

    class Authed:
        port = gw.port

    import tests.gateway.test_stream as ts

    orig = ts._request

    def with_key(port: int, body: dict[str, Any]) -> bytes:
        return orig(port, body).replace(b"Bearer sk-disconnect", f"Bearer {ta}".encode())

    ts._request = with_key  # type: ignore[assignment]
    try:
        svc = gw.service
        svc.limiter.enabled = False
        delays = [await _disconnect_trial(Authed(), mock, i) for i in range(6)]  # type: ignore[arg-type]
    finally:
        ts._request = orig  # type: ignore[assignment]
    assert max(delays) < 0.1, delays
    assert await asyncio.to_thread(gw.wait_idle) == 0


def test_jobs_check_the_model_permission_and_belong_to_the_principal(secured: tuple[GatewayServer, str, str]
                                                                     ) -> None:
    gw, ta, tb = secured
    gw.service.limiter.enabled = False
    ha, hb = {"Authorization": f"Bearer {ta}"}, {"Authorization": f"Bearer {tb}"}
    body = {"endpoint": "/v1/chat/completions", "body": {"model": "other-model", "messages": MSG}}
    r = httpx.post(gw.base_url + "/jobs", json=body, headers=ha)
    assert r.status_code == 403
    body["body"]["model"] = "mock-model"  # type: ignore[index]
    job = httpx.post(gw.base_url + "/jobs", json=body, headers=ha).json()
    assert httpx.get(f"{gw.base_url}/jobs/{job['id']}", headers=hb).status_code == 404  # not b's job
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.base_url}/jobs/{job['id']}", headers=ha).json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
