"""RBAC decisions are remembered per role value: a change to a role is seen at once (no stale allow)."""

from __future__ import annotations

from xcstack.security import rbac
from xcstack.security.rbac import Role, allowed
from xcstack.security.service import SYSTEM, Principal, SecurityService


def test_a_changed_role_is_a_new_decision() -> None:
    before = Role("client", (("model:a", "invoke"),))
    assert allowed([before], "model:a", "invoke")
    assert not allowed([before], "model:b", "invoke")
    after = Role("client", (("model:b", "invoke"),))  # same name, other permissions
    assert not allowed([after], "model:a", "invoke")
    assert allowed([after], "model:b", "invoke")
    denied = Role("client", (("model:*", "invoke"),), deny=(("model:a", "*"),))
    assert not allowed([denied], "model:a", "invoke")
    assert allowed([before], "model:a", "invoke")  # the first role's decision is still its own


def test_the_decision_table_is_bounded() -> None:
    role = Role("many", (("model:*", "invoke"),))
    for i in range(rbac.DECISIONS_MAX + 10):
        assert allowed([role], f"model:m{i}", "invoke")
    assert len(rbac._DECISIONS) <= rbac.DECISIONS_MAX


async def test_a_role_deleted_and_recreated_narrower_denies_at_once(service: SecurityService) -> None:
    service.role_cache_ttl_s = 0.0  # custom roles re-read per check: the remembered decision must follow
    await service.create_role(SYSTEM, "client", [("model:*", "invoke")])
    p = Principal("u1", "u1", ("client",))
    assert await service.is_allowed(p, "model:x", "invoke")
    await service.delete_role(SYSTEM, "client")
    assert not await service.is_allowed(p, "model:x", "invoke")
    await service.create_role(SYSTEM, "client", [("model:y", "invoke")])
    assert not await service.is_allowed(p, "model:x", "invoke")
    assert await service.is_allowed(p, "model:y", "invoke")
