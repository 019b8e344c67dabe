"""Roles: the custom roles (cached briefly per process), what a principal may do, and the rule that
a key never carries a right its creator lacks."""

from __future__ import annotations

import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

from xcstack.errors import BadRequest, Conflict, NotFound
from xcstack.security.auditor import Auditor
from xcstack.security.principal import Principal, ReqInfo
from xcstack.security.protocol import SecurityCode
from xcstack.security.rbac import (
    BUILTIN_ADMIN_ROLES,
    BUILTIN_ROLES,
    Perm,
    Role,
    allowed,
    check_custom_permissions,
)
from xcstack.security.repository import SecurityRepository


def glob_overlap(a: str, b: str) -> bool:
    """Whether two fnmatch patterns may match one common string; True when unsure (safe side)."""
    wild = "*?["
    if not any(c in a for c in wild):
        return fnmatchcase(a, b)
    if not any(c in b for c in wild):
        return fnmatchcase(b, a)
    pa, pb = (p[: min(p.find(c) if c in p else len(p) for c in wild)] for p in (a, b))
    if not (pa.startswith(pb) or pb.startswith(pa)):
        return False
    if "[" in a or "[" in b:
        return True
    sa, sb = a[max(a.rfind("*"), a.rfind("?")) + 1:], b[max(b.rfind("*"), b.rfind("?")) + 1:]
    return sa.endswith(sb) or sb.endswith(sa)


def covers(perms: list[Perm], res: str, act: str) -> bool:
    """Whether one of `perms` matches every string the pattern pair (res, act) can match (judged on the
    patterns as text: `*` covers `*`, `model:*` covers `model:a*`; unsure counts as not covered)."""
    return any(fnmatchcase(res, r) and fnmatchcase(act, a) for r, a in perms)


def excess_right(creator: list[Role], new: list[Role]) -> str | None:
    """The first right the roles `new` grant that the roles `creator` do not (None: none). An allow of
    `new` must be covered by an allow of `creator`, and each deny of `creator` it may touch must be
    repeated by a deny of `new` (else a sysadmin holding a custom deny role escapes it with a key)."""
    c_allow = [p for r in creator for p in r.allow]
    c_deny = [p for r in creator for p in r.deny]
    n_deny = [p for r in new for p in r.deny]
    for role in new:
        for res, act in role.allow:
            if not covers(c_allow, res, act):
                return f"{role.name}: {res} {act}"
            for dr, da in c_deny:
                if glob_overlap(res, dr) and glob_overlap(act, da) and not covers(n_deny, dr, da):
                    return f"{role.name}: {res} {act}, which the creator is denied as {dr} {da}"
    return None


class Roles:
    """Built-in and custom roles. Custom roles are re-read at most every `cache_ttl_s` for checks, and
    at once before an assignment or after a change made here."""

    def __init__(self, repo: SecurityRepository, audit: Auditor, clock: Callable[[], float],
                 cache_ttl_s: float = 2.0) -> None:
        self.repo = repo
        self.audit = audit
        self.clock = clock
        self.cache_ttl_s = cache_ttl_s
        self.custom: dict[str, Role] = {}
        self.loaded_at = -1e18  # monotonic

    async def load(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.loaded_at < self.cache_ttl_s:
            return
        self.custom = {r.name: r for r in await self.repo.custom_roles()}
        self.loaded_at = now

    def get(self, name: str) -> Role | None:
        return BUILTIN_ROLES.get(name) or self.custom.get(name)

    def of(self, principal: Principal) -> list[Role]:
        """The roles a principal holds that exist (a deleted custom role grants nothing)."""
        return [r for r in (self.get(n) for n in principal.roles) if r is not None]

    async def is_allowed(self, principal: Principal, resource: str, action: str) -> bool:
        await self.load()
        return allowed(self.of(principal), resource, action)

    async def check_assignable(self, roles: list[str]) -> None:
        """Every role exists, and at most one of the built-in administrator roles is held (三权分立)."""
        await self.load(force=True)
        for r in roles:
            if self.get(r) is None:
                raise BadRequest(f"unknown role {r!r}", code=SecurityCode.UNKNOWN_ROLE)
        if len([r for r in roles if r in BUILTIN_ADMIN_ROLES]) > 1:
            raise BadRequest("a user may hold at most one of sysadmin, secadmin, auditor (三权分立)",
                             code=SecurityCode.SEPARATION_OF_DUTIES)

    async def list_roles(self) -> list[dict[str, Any]]:
        await self.load(force=True)
        return [r.to_dict() for r in [*BUILTIN_ROLES.values(), *self.custom.values()]]

    async def create(self, actor: Principal, name: str, allow: list[Perm], deny: list[Perm] | None = None,
                     description: str = "", info: ReqInfo | None = None) -> dict[str, Any]:
        if name in BUILTIN_ROLES:
            raise Conflict(f"{name!r} is a built-in role", code=SecurityCode.ROLE_EXISTS)
        try:
            check_custom_permissions(allow)
        except ValueError as exc:
            await self.audit(actor.name, "role.create", f"role:{name}", "denied", info, {"reason": str(exc)})
            raise BadRequest(str(exc), code=SecurityCode.SEPARATION_OF_DUTIES) from None
        deny = deny or []
        role = Role(name, tuple((r, a) for r, a in allow), tuple((r, a) for r, a in deny), False, description)
        if not await self.repo.insert_role(role, self.clock()):
            raise Conflict(f"role {name!r} exists", code=SecurityCode.ROLE_EXISTS)
        await self.load(force=True)
        await self.audit(actor.name, "role.create", f"role:{name}", "success", info, {"allow": allow, "deny": deny})
        return self.custom[name].to_dict()

    async def delete(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        if name in BUILTIN_ROLES:
            raise BadRequest(f"{name!r} is a built-in role", code=SecurityCode.BUILTIN_ROLE)
        if not await self.repo.delete_role(name):
            raise NotFound(f"no role {name!r}", code=SecurityCode.ROLE_NOT_FOUND)
        await self.load(force=True)
        await self.audit(actor.name, "role.delete", f"role:{name}", "success", info)
