"""API keys: issued to a user, never carrying a right the issuer lacks, never outliving the key that
issued them; stored as a hash and checked in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from xcstack.errors import BadRequest, CoreCode, Forbidden, NotFound
from xcstack.security.auditor import Auditor
from xcstack.security.principal import Principal, ReqInfo
from xcstack.security.protocol import SecurityCode
from xcstack.security.rbac import BUILTIN_ADMIN_ROLES, BUILTIN_ROLES, Role
from xcstack.security.repository import ApiKeyRow, SecurityRepository
from xcstack.security.roles import Roles, excess_right
from xcstack.security.settings import SecuritySettings
from xcstack.security.tokens import KEY_PREFIX, MAX_TOKEN_LEN, AuthCache, new_api_key, token_hash


def public_key(k: ApiKeyRow) -> dict[str, Any]:
    """A key as listed through the API (never its hash)."""
    return {"id": k.id, "name": k.name, "roles": list(k.roles), "owner_id": k.owner_id, "created_at": k.created_at,
            "expires_at": k.expires_at, "revoked": k.revoked, "group": k.group}


RESTRICTED_CODES = {"password_change": SecurityCode.PASSWORD_CHANGE_REQUIRED,
                    "totp_enrollment": SecurityCode.TOTP_ENROLLMENT_REQUIRED}


def own_owner(actor: Principal) -> str | None:
    """Whose keys the caller's own are: a user's, or, called with an API key, that key's owner's."""
    return actor.owner_id if actor.kind == "api_key" else actor.id


class ApiKeys:
    def __init__(self, settings: SecuritySettings, repo: SecurityRepository, roles: Roles, cache: AuthCache,
                 audit: Auditor, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.repo = repo
        self.roles = roles
        self.cache = cache
        self.audit = audit
        self.clock = clock

    async def _refusal(self, actor: Principal, roles: list[str]) -> str | None:
        """Why `actor` may not issue a key with `roles` (None: it may)."""
        await self.roles.check_assignable(roles)
        for r in roles:
            if r in BUILTIN_ROLES and r not in actor.roles:
                return f"you cannot issue a key with role {r!r} that you do not hold"
        new: list[Role] = [role for role in (self.roles.get(r) for r in roles) if role is not None]
        excess = excess_right(self.roles.of(actor), new)
        return f"a key cannot carry rights its creator lacks ({excess})" if excess else None

    async def create(self, actor: Principal, name: str, roles: list[str], days: int | None = None,
                     info: ReqInfo | None = None) -> dict[str, Any]:
        """Issue a key owned by the creating user; a key created with an API key belongs to that key's
        owner (a key is never the owner of a key: `principal` joins the owner to `sec_users`), carries no
        right its creator lacks and does not outlive it."""
        reason = await self._refusal(actor, roles)
        if reason:
            await self.audit(actor.name, "apikey.create", f"apikey:{name}", "denied", info,
                             {"reason": reason, "roles": roles})
            raise Forbidden(reason, code=CoreCode.FORBIDDEN)
        days = days or self.settings.api_key_max_days
        if not 1 <= days <= self.settings.api_key_max_days:
            raise BadRequest(f"days must be 1..{self.settings.api_key_max_days}", code=CoreCode.INVALID_PARAMETER)
        now = self.clock()
        expires = now + days * 86400
        owner = actor.id
        if actor.kind == "api_key":
            parent = await self.repo.api_key(actor.id.removeprefix("apikey:"))
            if parent is None or actor.owner_id is None:
                await self.audit(actor.name, "apikey.create", f"apikey:{name}", "denied", info,
                                 {"reason": "the creating key no longer exists"})
                raise Forbidden("the API key this request was made with no longer exists", code=CoreCode.FORBIDDEN)
            owner = actor.owner_id
            expires = min(expires, parent.expires_at)
        kid, token = new_api_key()
        await self.repo.insert_api_key(ApiKeyRow(kid, name, token_hash(token), owner, tuple(roles), now, expires,
                                                 revoked=False))
        await self.audit(actor.name, "apikey.create", f"apikey:{kid}", "success", info,
                         {"name": name, "roles": roles, "days": days, "owner_id": owner})
        return {"id": kid, "name": name, "roles": roles, "expires_at": expires, "key": token}

    async def list_keys(self) -> list[dict[str, Any]]:
        return [public_key(k) for k in await self.repo.api_keys()]

    # -- self-service: a user's own keys (`/v1/security/me/keys`) ---------------------------------------
    async def create_own(self, actor: Principal, name: str, roles: list[str], days: int | None = None,
                         info: ReqInfo | None = None) -> dict[str, Any]:
        """A key for the caller with some of its own roles, never an administrator's role: the three
        administrators work signed in with their second factor, and a sysadmin's keys are issued
        through `/v1/security/keys` (audited as such). Then every rule of `create` applies."""
        await self._unrestricted(actor, "apikey.create", f"apikey:{name}", info)
        reason = None
        if admin := sorted(set(roles) & set(BUILTIN_ADMIN_ROLES)):
            reason = f"administrator roles are not self-service: {', '.join(admin)}"
        elif lacking := sorted(set(roles) - set(actor.roles)):
            reason = f"a key may carry only roles you hold; you do not hold {', '.join(lacking)}"
        if reason:
            await self.audit(actor.name, "apikey.create", f"apikey:{name}", "denied", info,
                             {"reason": reason, "roles": roles, "self_service": True})
            raise Forbidden(reason, code=CoreCode.FORBIDDEN)
        return await self.create(actor, name, roles, days, info)

    async def _unrestricted(self, actor: Principal, action: str, resource: str, info: ReqInfo | None) -> None:
        """A session restricted to a password change or TOTP enrolment may not issue or revoke keys
        (the self-service routes are open to it so that it can list them and finish its task)."""
        if actor.restricted:
            await self.audit(actor.name, action, resource, "denied", info, {"reason": actor.restricted})
            raise Forbidden(f"this session may only be used to complete: {actor.restricted.replace('_', ' ')}",
                            code=RESTRICTED_CODES.get(actor.restricted, CoreCode.FORBIDDEN))

    async def list_own(self, actor: Principal) -> list[dict[str, Any]]:
        owner = own_owner(actor)
        return [public_key(k) for k in await self.repo.api_keys() if k.owner_id == owner]

    async def revoke_own(self, actor: Principal, kid: str, info: ReqInfo | None = None) -> None:
        """Revoke one of the caller's keys; someone else's is not found (404: its existence is not told)."""
        await self._unrestricted(actor, "apikey.revoke", f"apikey:{kid}", info)
        key = await self.repo.api_key(kid)
        if key is None or key.owner_id != own_owner(actor):
            raise NotFound(f"no API key {kid!r}", code=SecurityCode.APIKEY_NOT_FOUND)
        await self.revoke(actor, kid, info)

    async def revoke(self, actor: Principal, kid: str, info: ReqInfo | None = None) -> None:
        if not await self.repo.revoke_api_key(kid):
            raise NotFound(f"no API key {kid!r}", code=SecurityCode.APIKEY_NOT_FOUND)
        self.cache.clear()
        await self.audit(actor.name, "apikey.revoke", f"apikey:{kid}", "success", info)

    async def principal(self, token: str) -> Principal | None:
        """The principal of a valid key (not revoked, not expired, owner enabled), else None."""
        parts = token[len(KEY_PREFIX):].split("_", 1)
        if len(parts) != 2 or len(token) > MAX_TOKEN_LEN:
            return None
        found = await self.repo.api_key_with_owner(parts[0])
        if found is None or not hmac.compare_digest(found.key.key_hash, token_hash(token)):
            return None
        k = found.key
        if k.revoked or found.owner_disabled or self.clock() >= k.expires_at:
            return None
        return Principal(f"apikey:{k.id}", f"apikey:{k.name}", k.roles, "api_key", owner_id=k.owner_id,
                         group=k.group or found.owner_group)
