"""Usage test fixtures: the gateway behind security and usage, on the mock upstream (tests/gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, make_settings, mock, mocks, upstream

__all__ = ["mock", "mocks"]
PW = "Usage-Pass-2024!"
USAGE_CAP = "xcstack.usage.capability"
SECURITY_CAP = "xcstack.security.capability"
PG = "postgresql://postgres@127.0.0.1:5432/"


def governed(tmp: Path, m: MockUpstream, usage: dict[str, Any] | None = None, state_url: str | None = None,
             security: bool = True) -> GatewayServer:
    from xcstack.security.settings import SecuritySettings
    from xcstack.usage.settings import UsageSettings

    tmp.mkdir(parents=True, exist_ok=True)
    settings = make_settings(tmp, [upstream(m)])
    settings.security = SecuritySettings.model_validate({"pbkdf2_iterations": 100_000})
    settings.usage = UsageSettings.model_validate({"ledger_flush_ms": 20, **(usage or {})})
    if state_url:
        from pydantic import SecretStr

        settings.state.url = SecretStr(state_url)
    mods = [SECURITY_CAP, USAGE_CAP, GATEWAY_CAP] if security else [USAGE_CAP, GATEWAY_CAP]
    return GatewayServer(settings, mods).start()


def login(gw: GatewayServer, name: str) -> dict[str, str]:
    token = httpx.post(gw.url + "/v1/auth/login", json={"username": name, "password": PW}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def setup_users(gw: GatewayServer, users: dict[str, tuple[list[str], str | None]]) -> None:
    """users: name -> (roles, group); the llm-user role may call mock-model."""
    from xcstack.security.service import SYSTEM

    svc = gw.cap("security").service

    async def run() -> None:
        if "llm-user" not in {r["name"] for r in await svc.list_roles()}:
            await svc.create_role(SYSTEM, "llm-user", [("route:/v1/*", "*"), ("model:*", "invoke")])
        for g in {g for _, g in users.values() if g}:
            if not await svc.groups.group_exists(g):
                await svc.groups.create(SYSTEM, g)
        for name, (roles, group) in users.items():
            await svc.create_user(SYSTEM, name, roles, kind="service", password=PW)
            if group:
                await svc.groups.assign_user(SYSTEM, name, group)

    gw.call(run)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped after)."""
    import uuid

    import psycopg

    name = "xc_usage_" + uuid.uuid4().hex[:8]
    try:
        with psycopg.connect(PG + "postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        yield PG + name
    finally:
        with psycopg.connect(PG + "postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def redis_url() -> Iterator[str]:

    import redis

    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        r.ping()
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"Redis not available: {exc}")
    yield "redis://127.0.0.1:6379/0"
    r.close()


def unique_prefix() -> str:
    import uuid

    return f"xc:usage-test:{uuid.uuid4().hex[:8]}:"
