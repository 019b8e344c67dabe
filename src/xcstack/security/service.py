"""The security service: one facade over accounts, sessions, API keys and roles — free of HTTP.

Routes, the console CLI and tests call this; the work is done by the parts it wires together
(`accounts`, `sessions`, `apikeys`, `roles`, `credentials`) over one repository that owns the SQL
(`repository`). Every decision is audited through the audit log (when one is attached): logins
(success and failure), lockouts, logouts, password changes, user/role/key administration and every
denial.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from xcstack.security.accounts import Accounts, public_user
from xcstack.security.apikeys import ApiKeys
from xcstack.security.audit.log import AuditLog
from xcstack.security.auditor import Auditor
from xcstack.security.credentials import AccountLocked, Credentials, InvalidCredentials, KdfPool
from xcstack.security.groups import Groups
from xcstack.security.lockout import Lockout
from xcstack.security.principal import SYSTEM, Principal, ReqInfo
from xcstack.security.repository import SecurityRepository, UserRow
from xcstack.security.roles import Roles
from xcstack.security.secretbox import SecretBox
from xcstack.security.sessions import Sessions
from xcstack.security.settings import SecuritySettings
from xcstack.security.tokens import AuthCache
from xcstack.state.store import StateStore

# Re-exported: routes, middleware, the CLI, benches and many tests import these from here.
__all__ = ["SYSTEM", "AccountLocked", "InvalidCredentials", "Principal", "ReqInfo", "SecurityService"]


class SecurityService:
    def __init__(
        self,
        settings: SecuritySettings,
        store: StateStore,
        secretbox: SecretBox,
        lockout: Lockout,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.box = secretbox
        self.lockout = lockout
        self.clock = clock
        self._auditor = Auditor(audit)
        self._kdf = KdfPool()
        self._cache = AuthCache()  # token hash -> principal: bounds the state-store reads per request
        repo = self._repo = SecurityRepository(store)
        credentials = Credentials(settings, repo, secretbox, lockout, self._kdf, self._auditor)
        self.roles = Roles(repo, self._auditor, clock)
        self.accounts = Accounts(settings, repo, credentials, self.roles, self._cache, self._auditor, clock)
        self.keys = ApiKeys(settings, repo, self.roles, self._cache, self._auditor, clock)
        self.sessions = Sessions(settings, repo, credentials, self.keys, self._cache, self._auditor, clock)
        self.groups = Groups(repo, self._cache, self._auditor, clock)

    # -- knobs kept as attributes (tests and the capability set them) ----------------------------------
    @property
    def audit_log(self) -> AuditLog | None:
        return self._auditor.log

    @audit_log.setter
    def audit_log(self, log: AuditLog | None) -> None:
        self._auditor.log = log

    @property
    def role_cache_ttl_s(self) -> float:
        return self.roles.cache_ttl_s

    @role_cache_ttl_s.setter
    def role_cache_ttl_s(self, seconds: float) -> None:
        self.roles.cache_ttl_s = seconds

    @property
    def kdf_wait_s(self) -> float:
        return self._kdf.wait_s

    @kdf_wait_s.setter
    def kdf_wait_s(self, seconds: float) -> None:
        self._kdf.wait_s = seconds

    @property
    def _kdf_slots(self) -> asyncio.Semaphore:
        return self._kdf.slots

    @_kdf_slots.setter
    def _kdf_slots(self, slots: asyncio.Semaphore) -> None:
        self._kdf.slots = slots

    # -- lifecycle and audit --------------------------------------------------------------------------
    async def init(self) -> None:
        await self._repo.migrate()

    def forget_sessions(self) -> None:
        """Drop this process's authentication cache (after revocations and role changes)."""
        self._cache.clear()

    async def audit(self, actor: str, action: str, resource: str, outcome: str, info: ReqInfo | None = None,
                    detail: dict[str, Any] | None = None, *, data_plane: bool = False) -> None:
        """Write one audit record (see `Auditor`): security events durable before this returns,
        `data_plane` call records within the configured window."""
        await self._auditor(actor, action, resource, outcome, info, detail, data_plane=data_plane)

    # -- accounts -------------------------------------------------------------------------------------
    async def bootstrap(self) -> list[tuple[str, str, str]]:
        return await self.accounts.bootstrap()

    async def get_user(self, name: str) -> dict[str, Any] | None:
        """The stored row of a user (columns as stored, hashes included): for the console CLI and tests."""
        user = await self._repo.user(name)
        return None if user is None else user.as_record()

    async def list_users(self) -> list[dict[str, Any]]:
        return await self.accounts.list_users()

    def public_user(self, r: dict[str, Any]) -> dict[str, Any]:
        return public_user(UserRow.from_record(r))

    async def create_user(self, actor: Principal, name: str, roles: list[str], kind: str = "human",
                          password: str | None = None, info: ReqInfo | None = None
                          ) -> tuple[dict[str, Any], str | None]:
        return await self.accounts.create(actor, name, roles, kind, password, info)

    async def set_disabled(self, actor: Principal, name: str, disabled: bool, info: ReqInfo | None = None) -> None:
        await self.accounts.set_disabled(actor, name, disabled, info)

    async def delete_user(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        await self.accounts.delete(actor, name, info)

    async def set_roles(self, actor: Principal, name: str, roles: list[str], info: ReqInfo | None = None) -> None:
        await self.accounts.set_roles(actor, name, roles, info)

    async def reset_password(self, actor: Principal, name: str, info: ReqInfo | None = None) -> str:
        return await self.accounts.reset_password(actor, name, info)

    async def change_password(self, principal: Principal, old: str, new: str, info: ReqInfo | None = None) -> None:
        await self.accounts.change_password(principal, old, new, info)

    async def totp_begin(self, principal: Principal, info: ReqInfo | None = None) -> dict[str, str]:
        return await self.accounts.totp_begin(principal, info)

    async def totp_confirm(self, principal: Principal, code: str, info: ReqInfo | None = None) -> list[str]:
        return await self.accounts.totp_confirm(principal, code, info)

    async def totp_reset(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        await self.accounts.totp_reset(actor, name, info)

    # -- sessions -------------------------------------------------------------------------------------
    async def login(self, username: str, password: str, totp_code: str | None = None,
                    recovery_code: str | None = None, info: ReqInfo | None = None) -> dict[str, Any]:
        return await self.sessions.login(username, password, totp_code, recovery_code, info)

    async def logout(self, principal: Principal, info: ReqInfo | None = None) -> None:
        await self.sessions.logout(principal, info)

    async def authenticate(self, token: str) -> Principal | None:
        return await self.sessions.authenticate(token)

    async def list_sessions(self) -> list[dict[str, Any]]:
        """The active sessions (id, user, created, last seen, ip; never a token)."""
        return await self.sessions.list_active()

    async def end_session(self, actor: Principal, sid: str, info: ReqInfo | None = None) -> None:
        """End a session by its listed id, also dropping this process's cached login for it."""
        await self.sessions.end(actor, sid, info)

    # -- API keys -------------------------------------------------------------------------------------
    async def create_api_key(self, actor: Principal, name: str, roles: list[str], days: int | None = None,
                             info: ReqInfo | None = None) -> dict[str, Any]:
        return await self.keys.create(actor, name, roles, days, info)

    async def list_api_keys(self) -> list[dict[str, Any]]:
        return await self.keys.list_keys()

    async def revoke_api_key(self, actor: Principal, kid: str, info: ReqInfo | None = None) -> None:
        await self.keys.revoke(actor, kid, info)

    async def create_own_api_key(self, actor: Principal, name: str, roles: list[str], days: int | None = None,
                                 info: ReqInfo | None = None) -> dict[str, Any]:
        return await self.keys.create_own(actor, name, roles, days, info)

    async def list_own_api_keys(self, actor: Principal) -> list[dict[str, Any]]:
        return await self.keys.list_own(actor)

    async def revoke_own_api_key(self, actor: Principal, kid: str, info: ReqInfo | None = None) -> None:
        await self.keys.revoke_own(actor, kid, info)

    # -- roles ----------------------------------------------------------------------------------------
    async def list_roles(self) -> list[dict[str, Any]]:
        return await self.roles.list_roles()

    async def create_role(self, actor: Principal, name: str, allow: list[tuple[str, str]],
                          deny: list[tuple[str, str]] | None = None, description: str = "",
                          info: ReqInfo | None = None) -> dict[str, Any]:
        return await self.roles.create(actor, name, allow, deny, description, info)

    async def delete_role(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        await self.roles.delete(actor, name, info)

    async def is_allowed(self, principal: Principal, resource: str, action: str) -> bool:
        return await self.roles.is_allowed(principal, resource, action)
