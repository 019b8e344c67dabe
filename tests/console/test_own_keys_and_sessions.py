"""The security service's parts behind the console's "my keys" and "sessions" views, over SQLite and
PostgreSQL (the session's client address is a schema migration): sessions listed without their
tokens and ended at once, even while this process has the login cached; own keys issued with own
roles only, bounded by the key a call is made with, and never someone else's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.security.conftest import FakeClock
from xcstack.errors import XCError
from xcstack.security.principal import ReqInfo
from xcstack.security.service import SYSTEM, Principal, SecurityService
from xcstack.state.store import StateStore

PW = "Own-Keys-Pass-2024!"


@pytest.fixture
async def svc(state: StateStore) -> AsyncIterator[tuple[SecurityService, FakeClock]]:
    """The security service over the security tests' `state` (SQLite, and PostgreSQL with its tables dropped
    first, so every schema migration runs), two service users and a role each."""
    from xcstack.security.lockout import StateLockout
    from xcstack.security.secretbox import LocalSecretBox
    from xcstack.security.settings import SecuritySettings

    settings = SecuritySettings(pbkdf2_iterations=100_000, auth_cache_s=60)  # a login stays cached
    clock = FakeClock()
    service = SecurityService(settings, state, LocalSecretBox(b"k" * 16),
                              StateLockout(state, settings.lockout_threshold, settings.lockout_s, clock), None, clock)
    await service.init()
    await service.create_role(SYSTEM, "reader", [("route:/v1/models", "get")])
    await service.create_role(SYSTEM, "writer", [("route:/v1/jobs", "post")])
    for name, roles in (("u1", ["reader"]), ("u2", ["reader", "writer"])):
        await service.create_user(SYSTEM, name, roles, kind="service", password=PW)
    yield service, clock


async def _login(service: SecurityService, name: str, ip: str) -> tuple[str, Principal]:
    token = (await service.login(name, PW, info=ReqInfo(ip)))["token"]
    principal = await service.authenticate(token)
    assert principal is not None
    return token, principal


async def test_sessions_listed_without_tokens_and_ended_at_once(svc: tuple[SecurityService, FakeClock]) -> None:
    from xcstack.security.tokens import token_hash

    service, clock = svc
    t1, _ = await _login(service, "u1", "10.0.0.7")
    t2, p2 = await _login(service, "u2", "10.0.0.8")
    listed = await service.list_sessions()
    assert [(s["user"], s["ip"]) for s in listed] == [("u1", "10.0.0.7"), ("u2", "10.0.0.8")]
    text = repr(listed)
    assert t1 not in text and token_hash(t1) not in text and token_hash(t1)[:16] not in text
    await service.end_session(p2, listed[0]["id"], ReqInfo("10.0.0.8"))
    assert await service.authenticate(t1) is None  # cached for 60 s, yet refused at once
    assert await service.authenticate(t2) is not None
    with pytest.raises(XCError) as err:
        await service.end_session(p2, listed[0]["id"])
    assert err.value.status == 404
    clock.t += service.settings.session_idle_s + 1  # idle past the timeout: not listed
    assert await service.list_sessions() == []


async def test_own_keys_own_roles_bounded_and_never_someone_elses(svc: tuple[SecurityService, FakeClock]) -> None:
    service, _ = svc
    _, p1 = await _login(service, "u1", "10.0.0.7")
    _, p2 = await _login(service, "u2", "10.0.0.8")
    for roles in (["writer"], ["reader", "sysadmin"], ["ghost"]):
        with pytest.raises(XCError) as err:
            await service.create_own_api_key(p1, "k", roles)
        assert (err.value.status, err.value.code) == (403, "forbidden"), roles
    k1 = await service.create_own_api_key(p1, "k1", ["reader"], 10)
    k2 = await service.create_own_api_key(p2, "k2", ["writer"])
    # made with a key: its owner's, with at most that key's roles and life
    via_key = await service.authenticate(k1["key"])
    assert via_key is not None
    k1b = await service.create_own_api_key(via_key, "k1b", ["reader"], 300)
    assert k1b["expires_at"] <= k1["expires_at"]
    with pytest.raises(XCError):
        await service.create_own_api_key(via_key, "k1c", ["writer"])
    assert sorted(k["name"] for k in await service.list_own_api_keys(p1)) == ["k1", "k1b"]
    assert sorted(k["name"] for k in await service.list_own_api_keys(via_key)) == ["k1", "k1b"]
    with pytest.raises(XCError) as err:
        await service.revoke_own_api_key(p1, k2["id"])
    assert (err.value.status, err.value.code) == (404, "apikey_not_found")
    assert await service.authenticate(k2["key"]) is not None
    await service.revoke_own_api_key(via_key, k1b["id"])
    assert await service.authenticate(k1b["key"]) is None


async def test_a_restricted_session_may_list_but_not_issue_or_revoke(svc: tuple[SecurityService, FakeClock]) -> None:
    service, _ = svc
    one_time = await service.reset_password(SYSTEM, "u1")
    token = (await service.login("u1", one_time))["token"]
    restricted = await service.authenticate(token)
    assert restricted is not None and restricted.restricted == "password_change"
    assert await service.list_own_api_keys(restricted) == []
    with pytest.raises(XCError) as err:
        await service.create_own_api_key(restricted, "k", ["reader"])
    assert (err.value.status, err.value.code) == (403, "password_change_required")
    with pytest.raises(XCError) as err:
        await service.revoke_own_api_key(restricted, "ghost")
    assert err.value.code == "password_change_required"
