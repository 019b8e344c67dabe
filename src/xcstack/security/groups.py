"""Groups (部门/租户): users and API keys belong to at most one; a key without its own is in its owner's.

Usage quotas and reports are kept per group (docs/usage.md). Managed by the role that manages users
(`security.group`: sysadmin), every change audited as a security event (durable before the answer).
Also the `GroupDirectory` the security capability gives other capabilities (`Services.groups`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xcstack.errors import BadRequest, Conflict, NotFound
from xcstack.security.auditor import Auditor
from xcstack.security.principal import Principal, ReqInfo
from xcstack.security.protocol import SecurityCode
from xcstack.security.repository import SecurityRepository
from xcstack.security.tokens import AuthCache


class Groups:
    def __init__(self, repo: SecurityRepository, cache: AuthCache, audit: Auditor, clock: Callable[[], float]) -> None:
        self.repo = repo
        self.cache = cache
        self.audit = audit
        self.clock = clock

    async def list(self) -> list[dict[str, Any]]:
        return [{"name": g["name"], "description": g["description"], "created_at": float(g["created_at"]),
                 "users": int(g["users"]), "keys": int(g["keys"])} for g in await self.repo.groups()]

    async def create(self, actor: Principal, name: str, description: str = "", info: ReqInfo | None = None) -> None:
        if not await self.repo.insert_group(name, description, self.clock()):
            await self.audit(actor.name, "group.create", f"group:{name}", "failure", info, {"reason": "exists"})
            raise Conflict(f"group {name!r} exists", code=SecurityCode.GROUP_EXISTS)
        await self.audit(actor.name, "group.create", f"group:{name}", "success", info, {"description": description})

    async def delete(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        why = await self.repo.delete_group(name)
        if why == "missing":
            raise NotFound(f"no group {name!r}", code=SecurityCode.GROUP_NOT_FOUND)
        if why is not None:
            await self.audit(actor.name, "group.delete", f"group:{name}", "failure", info, {"reason": why})
            raise Conflict(f"group {name!r} still has users or API keys; move them first",
                           code=SecurityCode.GROUP_IN_USE)
        await self.audit(actor.name, "group.delete", f"group:{name}", "success", info)

    async def assign_user(self, actor: Principal, user: str, group: str | None, info: ReqInfo | None = None) -> None:
        row = await self.repo.user(user)
        if row is None:
            raise NotFound(f"no user {user!r}", code=SecurityCode.USER_NOT_FOUND)
        await self._assign(actor, "sec_users", row.id, f"user:{user}", row.group, group, info)

    async def assign_key(self, actor: Principal, kid: str, group: str | None, info: ReqInfo | None = None) -> None:
        key = await self.repo.api_key(kid)
        if key is None:
            raise NotFound(f"no API key {kid!r}", code=SecurityCode.APIKEY_NOT_FOUND)
        await self._assign(actor, "sec_api_keys", kid, f"apikey:{kid}", key.group, group, info)

    async def _assign(self, actor: Principal, table: str, row_id: str, resource: str, old: str | None,
                      group: str | None, info: ReqInfo | None) -> None:
        if not await self.repo.set_group(table, row_id, group):
            await self.audit(actor.name, "group.assign", resource, "failure", info,
                             {"reason": "unknown group", "group": group})
            raise BadRequest(f"no group {group!r}", code=SecurityCode.GROUP_NOT_FOUND, param="group")
        self.cache.clear()  # principals carry their group
        await self.audit(actor.name, "group.assign", resource, "success", info, {"old": old, "new": group})

    # -- GroupDirectory (Services.groups) -------------------------------------------------------------
    async def group_exists(self, name: str) -> bool:
        return await self.repo.group_exists(name)

    async def user_id(self, name: str) -> str | None:
        row = await self.repo.user(name)
        return None if row is None else row.id
