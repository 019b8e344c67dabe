"""The security service's parts below the facade: the repository's typed rows and compare-and-set
writes (SQLite and PostgreSQL), token hashing, the auth cache and the key-rights rule."""

from __future__ import annotations

import pyotp
import pytest

from xcstack.security.principal import SYSTEM, Principal
from xcstack.security.rbac import BUILTIN_ROLES, Role
from xcstack.security.repository import NewUser, SecurityRepository, UserRow
from xcstack.security.roles import excess_right, glob_overlap
from xcstack.security.service import SecurityService
from xcstack.security.tokens import CACHE_MAX, AuthCache, token_hash

from .conftest import FakeClock

GOOD = "Correct-Horse-42"


def test_token_hash_is_the_sm3_hex_sessions_and_keys_were_stored_under() -> None:
    # GB/T 32905 test vector: a stored session or key hash must not change across the refactor
    assert token_hash("abc") == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"


async def test_get_user_is_the_stored_row_column_for_column(service: SecurityService, state: object,
                                                            clock: FakeClock) -> None:
    await service.bootstrap()  # first-start users: no password history yet (NULL)
    await service.create_role(SYSTEM, "reader", [("model:*", "invoke")])
    await service.create_user(SYSTEM, "bob", ["auditor", "reader"], kind="human", password=GOOD)
    bob = Principal((await service.get_user("bob") or {})["id"], "bob", ("auditor", "reader"))
    secret = (await service.totp_begin(bob))["secret"]  # sealed secret in the row
    await service.totp_confirm(bob, pyotp.TOTP(secret).at(clock()))  # recovery codes, last step
    for name in ("admin", "bob"):
        stored = await state.fetchone("SELECT * FROM sec_users WHERE name = ?", (name,))  # type: ignore[attr-defined]
        assert await service.get_user(name) == stored
    assert service.public_user(stored)["roles"] == ["auditor", "reader"]


async def test_user_rows_are_typed(service: SecurityService, state: object) -> None:
    await service.create_user(SYSTEM, "bob", ["auditor"], kind="service", password=GOOD)
    user = await SecurityRepository(state).user("bob")  # type: ignore[arg-type]
    assert isinstance(user, UserRow)
    assert user.roles == ("auditor",) and user.must_change is False and user.disabled is False
    assert user.pw_history == (user.pw_hash,) and user.recovery is None and isinstance(user.pw_changed_at, float)


async def test_second_factor_writes_are_compare_and_set(service: SecurityService, state: object) -> None:
    repo = SecurityRepository(state)  # type: ignore[arg-type]
    assert await repo.insert_user(NewUser("u1", "carol", "human", (), "h", False, 1.0))
    assert not await repo.insert_user(NewUser("u2", "carol", "human", (), "h", False, 1.0))  # name taken
    assert await repo.advance_totp_step("u1", 5) and not await repo.advance_totp_step("u1", 5)
    assert not await repo.advance_totp_step("u1", 4)  # a step is never reused, nor an older one
    await repo.enable_totp("u1", ["a", "b"])
    assert not await repo.replace_recovery("u1", ["b", "a"], ["b"])  # someone else's view of the codes
    assert await repo.replace_recovery("u1", ["a", "b"], ["b"])
    assert not await repo.replace_recovery("u1", ["a", "b"], ["b"])  # the same code twice: one wins
    user = await repo.user("carol")
    assert user is not None and user.recovery == ("b",) and user.totp_enabled and user.totp_last_step == 5


async def test_custom_roles_round_trip(service: SecurityService, state: object) -> None:
    repo = SecurityRepository(state)  # type: ignore[arg-type]
    role = Role("reader", (("model:*", "invoke"),), (("model:secret", "*"),), False, "reads")
    assert await repo.insert_role(role, 1.0) and not await repo.insert_role(role, 2.0)
    assert await repo.custom_roles() == [role]
    assert await repo.delete_role("reader") and not await repo.delete_role("reader")


def test_auth_cache_ttl_and_bound() -> None:
    cache, p = AuthCache(), Principal("u", "u", ())
    cache.put("t", 100.0, p)
    assert cache.get("t", 100.5, 1.0) is p
    assert cache.get("t", 101.0, 1.0) is None and cache.get("t", 99.0, 1.0) is None  # expired; clock went back
    for i in range(CACHE_MAX):
        cache.put(str(i), 100.0, p)
    assert cache.get("t", 100.0, 1.0) is None  # a full cache is dropped whole, never grows past the bound


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("model:a*", "model:*", True), ("model:a*", "model:b*", False), ("x", "x", True), ("*.log", "*.txt", False),
])
def test_glob_overlap(a: str, b: str, overlap: bool) -> None:
    assert glob_overlap(a, b) is overlap and glob_overlap(b, a) is overlap


def test_excess_right_names_what_the_creator_lacks_or_is_denied() -> None:
    sysadmin = BUILTIN_ROLES["sysadmin"]
    no_secret = Role("no-secret", (), (("model:secret", "*"),))
    assert excess_right([sysadmin], [BUILTIN_ROLES["secadmin"]]) is not None  # sysadmin is denied security.role
    assert excess_right([sysadmin, no_secret], [sysadmin]) is not None  # the deny would be escaped
    assert excess_right([sysadmin, no_secret], [sysadmin, no_secret]) is None
