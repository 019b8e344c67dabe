"""Users, passwords, TOTP, lockout, sessions, API keys, roles (service level, no HTTP)."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import pyotp
import pytest

from xcstack.errors import BadRequest, Forbidden, Unauthorized
from xcstack.security import passwords
from xcstack.security.lockout import RedisLockout, StateLockout, identity_key
from xcstack.security.passwords import PasswordPolicyError
from xcstack.security.service import SYSTEM, AccountLocked, InvalidCredentials, SecurityService

from .conftest import FakeClock, audit_records

GOOD = "Correct-Horse-42"


async def _user(svc: SecurityService, name: str = "bob", roles: list[str] | None = None) -> None:
    await svc.create_user(SYSTEM, name, roles or [], kind="service", password=GOOD)


async def test_password_hash_formats() -> None:
    h = passwords.hash_password("pw-Example-123")
    scheme, iters, salt, _ = h.split("$")
    assert scheme == "pbkdf2-sm3" and int(iters) >= 100_000 and len(__import__("base64").b64decode(salt)) == 16
    assert passwords.verify_password("pw-Example-123", h)
    assert not passwords.verify_password("pw-Example-124", h)
    a = passwords.hash_password("pw-Example-123", "argon2id")
    assert a.startswith("$argon2id$") and passwords.verify_password("pw-Example-123", a)
    assert not passwords.verify_password("nope", a)


@pytest.mark.parametrize(("pw", "why"), [
    ("Short-1a", "at least 12"),
    ("alllowercaseletters", "at least 3"),
    ("Bob-is-great-123", "user name"),
])
def test_password_policy(pw: str, why: str) -> None:
    with pytest.raises(PasswordPolicyError, match=why):
        passwords.check_policy(pw, "bob")
    with pytest.raises(PasswordPolicyError, match="at least 4"):
        passwords.check_policy("Upper-and-lower-only", "x", min_classes=4)
    passwords.check_policy("Upper-lower-9-sym", "x", min_classes=4)


async def test_bootstrap_three_admins_once_with_forced_change(service: SecurityService) -> None:
    created = await service.bootstrap()
    assert [(n, r) for n, r, _ in created] == [("admin", "sysadmin"), ("secadmin", "secadmin"), ("auditor", "auditor")]
    assert await service.bootstrap() == []  # only on first start
    name, _, pw = created[0]
    out = await service.login(name, pw)
    assert out["restricted"] == "password_change"


async def test_same_error_for_unknown_user_and_wrong_password(service: SecurityService) -> None:
    await _user(service)
    with pytest.raises(InvalidCredentials) as a:
        await service.login("bob", "Wrong-password-1")
    with pytest.raises(InvalidCredentials) as b:
        await service.login("nobody", "Wrong-password-1")
    assert (a.value.status, a.value.code, a.value.message) == (b.value.status, b.value.code, b.value.message)


async def test_lockout_after_five_failures_then_unlock(service: SecurityService, clock: FakeClock) -> None:
    await _user(service)
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            await service.login("bob", "Wrong-password-1")
    with pytest.raises(AccountLocked) as exc:
        await service.login("bob", GOOD)  # even the right password is refused while locked
    assert exc.value.status == 429 and int(exc.value.headers["Retry-After"]) > 800
    clock.advance(15 * 60 + 1)
    assert (await service.login("bob", GOOD))["token"]
    actions = [(r["action"], r["outcome"]) for r in audit_records(Path(service.audit_log.root))]  # type: ignore[union-attr]
    assert ("auth.lockout", "success") in actions and ("auth.login", "denied") in actions


async def test_lockout_unknown_users_too(service: SecurityService) -> None:
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            await service.login("ghost", "Wrong-password-1")
    with pytest.raises(AccountLocked):
        await service.login("ghost", "Wrong-password-1")


async def test_lockout_shared_by_two_instances_over_redis(state: object) -> None:
    prefix = f"xc:security:test:{uuid.uuid4().hex}:"
    url = os.environ.get("XC_TEST_REDIS", "redis://127.0.0.1:6379/0")
    a = RedisLockout(url, prefix, threshold=5, lock_s=900)
    b = RedisLockout(url, prefix, threshold=5, lock_s=900)
    try:
        key = identity_key("carol")
        for i in range(4):
            await (a if i % 2 else b).failure(key)
        assert await a.locked_for(key) == 0
        assert await b.failure(key) > 800  # the 5th failure, counted by the other node, locks
        assert await a.locked_for(key) > 800
        await a.reset(key)
        assert await b.locked_for(key) == 0
    finally:
        await a.redis.delete(*[k async for k in a.redis.scan_iter(prefix + "*")] or [prefix + "none"])
        await a.close()
        await b.close()


async def test_two_service_instances_share_lockout_over_redis(state: object, tmp_path: Path, clock: FakeClock) -> None:
    from xcstack.security.secretbox import LocalSecretBox
    from xcstack.security.settings import SecuritySettings

    prefix = f"xc:security:test:{uuid.uuid4().hex}:"
    settings = SecuritySettings()
    nodes = [SecurityService(settings, state, LocalSecretBox(b"k" * 16),  # type: ignore[arg-type]
                             RedisLockout("redis://127.0.0.1:6379/0", prefix, 5, 900), None, clock)
             for _ in range(2)]
    await nodes[0].init()
    await _user(nodes[0], "dave")
    try:
        for i in range(5):
            with pytest.raises(InvalidCredentials):
                await nodes[i % 2].login("dave", "Wrong-password-1")
        for node in nodes:
            with pytest.raises(AccountLocked):
                await node.login("dave", GOOD)
    finally:
        r = nodes[0].lockout.redis  # type: ignore[attr-defined]
        keys = [k async for k in r.scan_iter(prefix + "*")]
        if keys:
            await r.delete(*keys)
        for node in nodes:
            await node.lockout.close()


async def test_state_lockout_counts(state: object, clock: FakeClock, service: SecurityService) -> None:
    lk = StateLockout(state, 3, 60, clock)  # type: ignore[arg-type]
    assert await lk.failure("k") == 0
    assert await lk.failure("k") == 0
    assert await lk.failure("k") == 60
    clock.advance(61)
    assert await lk.locked_for("k") == 0
    assert await lk.failure("k") == 0  # fresh count after the lock expired


async def _enrol(svc: SecurityService, clock: FakeClock, name: str = "erin") -> tuple[str, list[str]]:
    await svc.create_user(SYSTEM, name, [], kind="human", password=GOOD)
    login = await svc.login(name, GOOD)
    assert login["restricted"] == "totp_enrollment"
    p = await svc.authenticate(login["token"])
    assert p is not None
    begin = await svc.totp_begin(p)
    assert begin["otpauth_uri"].startswith("otpauth://totp/") and "issuer=xcstack" in begin["otpauth_uri"]
    assert "█" in begin["qr"] or "▀" in begin["qr"] or "▄" in begin["qr"]
    code = pyotp.TOTP(begin["secret"]).at(clock())
    codes = await svc.totp_confirm(p, code)
    assert len(codes) == 10
    p2 = await svc.authenticate(login["token"])
    assert p2 is not None and p2.restricted is None
    return begin["secret"], codes


async def test_totp_required_and_replay_rejected(service: SecurityService, clock: FakeClock) -> None:
    secret, _ = await _enrol(service, clock)
    clock.advance(30)
    with pytest.raises(Unauthorized) as e:
        await service.login("erin", GOOD)
    assert e.value.code == "totp_required"
    code = pyotp.TOTP(secret).at(clock())
    assert (await service.login("erin", GOOD, totp_code=code))["restricted"] is None
    with pytest.raises(InvalidCredentials) as e2:  # the same code again: replay
        await service.login("erin", GOOD, totp_code=code)
    assert e2.value.code == "invalid_totp"
    # the previous step's code (inside the ±1 window, but older than the accepted one) is refused too
    with pytest.raises(InvalidCredentials):
        await service.login("erin", GOOD, totp_code=pyotp.TOTP(secret).at(clock() - 30))
    clock.advance(30)
    assert await service.login("erin", GOOD, totp_code=pyotp.TOTP(secret).at(clock()))
    # the secret is stored sealed (SM4-GCM), never in clear
    row = await service.get_user("erin")
    assert row is not None and secret not in row["totp_secret"]


async def test_recovery_codes_are_hashed_and_single_use(service: SecurityService, clock: FakeClock) -> None:
    _, codes = await _enrol(service, clock)
    row = await service.get_user("erin")
    assert row is not None and codes[0] not in row["recovery"]
    assert await service.login("erin", GOOD, recovery_code=codes[0])
    with pytest.raises(InvalidCredentials):
        await service.login("erin", GOOD, recovery_code=codes[0])


async def test_session_idle_timeout(service: SecurityService, clock: FakeClock) -> None:
    await _user(service)
    tok = (await service.login("bob", GOOD))["token"]
    for _ in range(6):  # activity every 14 minutes keeps the session alive
        clock.advance(14 * 60)
        assert await service.authenticate(tok) is not None
    clock.advance(15 * 60 + 1)
    assert await service.authenticate(tok) is None
    assert await service.authenticate(tok) is None  # and it is gone for good


async def test_session_absolute_timeout(service: SecurityService, clock: FakeClock) -> None:
    await _user(service)
    tok = (await service.login("bob", GOOD))["token"]
    start = clock()
    for _ in range(80):  # active every 10 minutes: the idle timeout never fires
        clock.advance(10 * 60)
        if await service.authenticate(tok) is None:
            break
    assert await service.authenticate(tok) is None
    assert 12 * 3600 < clock() - start <= 12 * 3600 + 600


async def test_token_is_opaque_256_bit_and_stored_hashed(service: SecurityService, state: object) -> None:
    await _user(service)
    tok = (await service.login("bob", GOOD))["token"]
    assert tok.startswith("xcs_") and len(tok) >= 4 + 43
    rows = await state.fetchall("SELECT token_hash FROM sec_sessions")  # type: ignore[attr-defined]
    assert rows and all(tok not in r["token_hash"] for r in rows)


async def test_logout_and_disable_revoke(service: SecurityService) -> None:
    await _user(service)
    await _user(service, "admin2", ["sysadmin"])
    t1 = (await service.login("bob", GOOD))["token"]
    t2 = (await service.login("bob", GOOD))["token"]
    p1 = await service.authenticate(t1)
    assert p1 is not None
    await service.logout(p1)
    assert await service.authenticate(t1) is None
    assert await service.authenticate(t2) is not None
    admin = await service.authenticate((await service.login("admin2", GOOD))["token"])
    assert admin is not None
    key = await service.create_api_key(admin, "k", [])
    await service.set_disabled(admin, "bob", True)
    assert await service.authenticate(t2) is None
    with pytest.raises(InvalidCredentials):
        await service.login("bob", GOOD)
    # a disabled owner's API keys stop working too
    await service.set_disabled(admin, "admin2", False)
    assert await service.authenticate(key["key"]) is not None


async def test_password_change_history_and_must_change(service: SecurityService) -> None:
    _, one_time = await service.create_user(SYSTEM, "frank", [], kind="service")
    assert one_time
    login = await service.login("frank", one_time)
    assert login["restricted"] == "password_change"
    p = await service.authenticate(login["token"])
    assert p is not None
    with pytest.raises(InvalidCredentials):
        await service.change_password(p, "wrong-Old-pass-1", "Brand-New-Pass-1")
    pws = [f"Rotating-Pass-{i}x" for i in range(6)]
    await service.change_password(p, one_time, pws[0])
    p = await service.authenticate(login["token"])
    assert p is not None and p.restricted is None
    for prev, new in itertools.pairwise(pws):
        await service.change_password(p, prev, new)
    with pytest.raises(PasswordPolicyError, match="last 5"):
        await service.change_password(p, pws[5], pws[2])  # one of the last five
    await service.change_password(p, pws[5], pws[0])  # six back: allowed again


async def test_password_expiry_forces_change(service: SecurityService, clock: FakeClock) -> None:
    await _user(service)
    clock.advance(91 * 86400)
    out = await service.login("bob", GOOD)
    assert out["password_expired"] and out["restricted"] == "password_change"


async def test_api_keys_scoped_expiring_revocable(service: SecurityService, clock: FakeClock) -> None:
    await _user(service, "ops", ["sysadmin"])
    ops = await service.authenticate((await service.login("ops", GOOD))["token"])
    assert ops is not None
    await service.create_role(SYSTEM, "llm-user", [("route:/v1/chat/*", "post"), ("model:qwen*", "invoke")])
    with pytest.raises(Forbidden):
        await service.create_api_key(ops, "k", ["auditor"])  # a role the creator does not hold
    k = await service.create_api_key(ops, "svc", ["llm-user"], days=1)
    assert k["key"].startswith("xck_")
    p = await service.authenticate(k["key"])
    assert p is not None and p.roles == ("llm-user",) and p.kind == "api_key"
    assert await service.is_allowed(p, "model:qwen2-7b", "invoke")
    assert not await service.is_allowed(p, "model:other", "invoke")
    assert await service.authenticate(k["key"][:-1] + ("A" if k["key"][-1] != "A" else "B")) is None
    listed = await service.list_api_keys()
    assert all("key" not in x for x in listed)
    clock.advance(86400 + 1)
    assert await service.authenticate(k["key"]) is None  # expired
    k2 = await service.create_api_key(ops, "svc2", ["llm-user"], days=1)
    await service.revoke_api_key(ops, k2["id"])
    assert await service.authenticate(k2["key"]) is None


async def test_separation_of_duties(service: SecurityService) -> None:
    with pytest.raises(BadRequest) as e:
        await service.create_user(SYSTEM, "x", ["sysadmin", "auditor"], password=GOOD, kind="service")
    assert e.value.code == "separation_of_duties"
    for perm in [("audit", "read"), ("*", "*"), ("security.role", "write"), ("aud*", "read"), ("security.*", "x")]:
        with pytest.raises(BadRequest):
            await service.create_role(SYSTEM, "sneaky", [perm])
    await _user(service, "ops", ["sysadmin"])
    ops = await service.authenticate((await service.login("ops", GOOD))["token"])
    assert ops is not None
    assert not await service.is_allowed(ops, "audit", "read")
    assert not await service.is_allowed(ops, "security.role", "assign")
    with pytest.raises(Forbidden):  # sysadmin creates accounts, but cannot hand out roles
        await service.create_user(ops, "y", ["auditor"], password=GOOD, kind="service")


async def test_auth_cache_bounds_revocation_delay_across_workers(service: SecurityService, state: object,
                                                                 clock: FakeClock) -> None:
    from xcstack.security.lockout import StateLockout
    from xcstack.security.secretbox import LocalSecretBox

    other = SecurityService(service.settings, state, LocalSecretBox(b"k" * 16),  # type: ignore[arg-type]
                            StateLockout(state, 5, 900, clock), None, clock)  # type: ignore[arg-type]
    await _user(service)
    await _user(service, "root2", ["sysadmin"])
    tok = (await service.login("bob", GOOD))["token"]
    assert await other.authenticate(tok) is not None  # "another worker" caches the check
    root = await service.authenticate((await service.login("root2", GOOD))["token"])
    assert root is not None
    await service.set_disabled(root, "bob", True)
    assert await service.authenticate(tok) is None  # the revoking process: at once
    clock.advance(service.settings.auth_cache_s)
    assert await other.authenticate(tok) is None  # the other process: within auth_cache_s


async def test_login_flood_is_bounded(service: SecurityService) -> None:
    from xcstack.errors import Overloaded

    await _user(service)
    service._kdf_slots = __import__("asyncio").Semaphore(0)  # every slot busy
    service.kdf_wait_s = 0.05
    with pytest.raises(Overloaded) as exc:
        await service.login("bob", GOOD)
    assert exc.value.status == 503 and exc.value.code == "auth_overloaded"
