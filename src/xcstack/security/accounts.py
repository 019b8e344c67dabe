"""Accounts: users and their administration (三权分立 enforced here), passwords and TOTP enrolment.

Every change is audited; a change that affects who may do what ends the sessions it must and drops
this process's authentication cache."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from xcstack.errors import BadRequest, Conflict, CoreCode, Forbidden, NotFound
from xcstack.security import passwords, totp
from xcstack.security.auditor import Auditor
from xcstack.security.credentials import Credentials, InvalidCredentials
from xcstack.security.lockout import identity_key
from xcstack.security.principal import SYSTEM, Principal, ReqInfo
from xcstack.security.protocol import SecurityCode
from xcstack.security.rbac import BUILTIN_ADMIN_ROLES
from xcstack.security.repository import NewUser, SecurityRepository, UserRow
from xcstack.security.roles import Roles
from xcstack.security.settings import SecuritySettings
from xcstack.security.tokens import AuthCache


def public_user(u: UserRow) -> dict[str, Any]:
    """A user as shown through the API and the CLI (no hashes, no secrets)."""
    return {
        "id": u.id, "name": u.name, "kind": u.kind, "roles": list(u.roles), "disabled": u.disabled,
        "must_change_password": u.must_change, "totp_enabled": u.totp_enabled, "created_at": u.created_at,
        "password_changed_at": u.pw_changed_at, "group": u.group,
    }


class Accounts:
    def __init__(self, settings: SecuritySettings, repo: SecurityRepository, credentials: Credentials,
                 roles: Roles, cache: AuthCache, audit: Auditor, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.repo = repo
        self.credentials = credentials
        self.roles = roles
        self.cache = cache
        self.audit = audit
        self.clock = clock

    # -- first start ----------------------------------------------------------------------------------
    async def bootstrap(self) -> list[tuple[str, str, str]]:
        """On first start (no users): create the three administrators, each with a one-time password
        that must be changed at first login. Returns [(name, role, password)] — print once, never log."""
        names = [(self.settings.admin_user, "sysadmin"), ("secadmin", "secadmin"), ("auditor", "auditor")]
        now = self.clock()
        prepared: list[tuple[NewUser, str]] = []
        for name, role in names:
            pw = passwords.generate_password()
            h = await self.credentials.hash_password(pw)
            prepared.append((NewUser(uuid.uuid4().hex, name, "human", (role,), h, True, now), pw))
        try:
            made = await self.repo.insert_first_users([u for u, _ in prepared])
        except Exception:  # another worker won the race (unique name)
            made = False
        if not made:
            return []
        created = [(u.name, u.roles[0], pw) for u, pw in prepared]
        for name, role, _ in created:
            await self.audit("system", "user.bootstrap", f"user:{name}", "success", detail={"role": role})
        return created

    # -- users ----------------------------------------------------------------------------------------
    async def list_users(self) -> list[dict[str, Any]]:
        return [public_user(u) for u in await self.repo.users()]

    async def require(self, name: str) -> UserRow:
        user = await self.repo.user(name)
        if user is None:
            raise NotFound(f"no user {name!r}", code=SecurityCode.USER_NOT_FOUND)
        return user

    async def create(self, actor: Principal, name: str, roles: list[str], kind: str = "human",
                     password: str | None = None, info: ReqInfo | None = None) -> tuple[dict[str, Any], str | None]:
        """Create a user; without `password` a one-time password is generated (returned once). Either way a
        password someone else chose is one-time: the account must change it at first login, like the
        first-start passwords. Only the in-process `system` principal (provisioning code, tests) sets a
        lasting password; the console CLI never passes one."""
        if kind not in ("human", "service"):
            raise BadRequest("kind must be 'human' or 'service'", code=CoreCode.INVALID_PARAMETER)
        if roles and actor.kind != "system" and not await self.roles.is_allowed(actor, "security.role", "assign"):
            await self.audit(actor.name, "user.create", f"user:{name}", "denied", info,
                             {"reason": "role assignment needs security.role:assign", "roles": roles})
            raise Forbidden("assigning roles is the security administrator's right (三权分立)", code=CoreCode.FORBIDDEN)
        await self.roles.check_assignable(roles)
        one_time = None
        if password is None:
            password = one_time = passwords.generate_password()
        else:
            passwords.check_policy(password, name, self.settings.password_min_length,
                                   self.settings.password_min_classes)
        h = await self.credentials.hash_password(password)
        must_change = not (actor == SYSTEM and not one_time)
        if not await self.repo.insert_user(NewUser(uuid.uuid4().hex, name, kind, tuple(roles), h, must_change,
                                                   self.clock())):
            await self.audit(actor.name, "user.create", f"user:{name}", "failure", info, {"reason": "exists"})
            raise Conflict(f"user {name!r} exists", code=SecurityCode.USER_EXISTS)
        await self.audit(actor.name, "user.create", f"user:{name}", "success", info, {"roles": roles, "kind": kind})
        return public_user(await self.require(name)), one_time

    async def _guard_admin_account(self, actor: Principal, user: UserRow, action: str,
                                   info: ReqInfo | None) -> None:
        """三权分立: an account holding sysadmin, secadmin or auditor cannot be taken over through the
        API by another administrator (a reset password would be handed to the resetter). Those
        accounts are managed from the server console (`xcstack user ...`, actor `cli:<os user>`)."""
        roles = set(user.roles)
        if actor.kind == "system" or actor.id == user.id or not roles & set(BUILTIN_ADMIN_ROLES):
            return
        await self.audit(actor.name, action, f"user:{user.name}", "denied", info,
                         {"reason": "administrator account", "roles": sorted(roles)})
        raise Forbidden("accounts of the sysadmin, secadmin and auditor roles are managed from the server "
                        "console (xcstack user ...), not through the API (三权分立)", code=CoreCode.FORBIDDEN)

    async def set_disabled(self, actor: Principal, name: str, disabled: bool, info: ReqInfo | None = None) -> None:
        user = await self.require(name)
        action = "user.disable" if disabled else "user.enable"
        await self._guard_admin_account(actor, user, action, info)
        if actor.id == user.id and disabled:
            raise BadRequest("you cannot disable yourself", code=CoreCode.INVALID_PARAMETER)
        await self.repo.set_disabled(user.id, disabled)
        self.cache.clear()
        await self.audit(actor.name, action, f"user:{name}", "success", info)

    async def delete(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        user = await self.require(name)
        await self._guard_admin_account(actor, user, "user.delete", info)
        if actor.id == user.id:
            raise BadRequest("you cannot delete yourself", code=CoreCode.INVALID_PARAMETER)
        await self.repo.delete_user(user.id)
        self.cache.clear()
        await self.audit(actor.name, "user.delete", f"user:{name}", "success", info)

    async def set_roles(self, actor: Principal, name: str, roles: list[str], info: ReqInfo | None = None) -> None:
        """三权分立 through the API: nobody changes their own roles, the built-in administrator roles are
        granted and taken away only from the server console, and an administrator account's roles are not
        changed by another administrator (the secadmin would otherwise make itself sysadmin, give itself
        operational rights, or strip the auditor)."""
        user = await self.require(name)
        await self.roles.check_assignable(roles)
        old = list(user.roles)
        if actor.kind != "system":
            reason = ""
            if user.id in (actor.id, actor.owner_id):
                reason = "you cannot change your own roles"
            elif (set(roles) ^ set(old)) & set(BUILTIN_ADMIN_ROLES):
                reason = ("the sysadmin, secadmin and auditor roles are granted and removed from the server "
                          "console (xcstack user set-roles ...), not through the API")
            if reason:
                await self.audit(actor.name, "user.roles", f"user:{name}", "denied", info,
                                 {"reason": reason, "old": sorted(old), "new": roles})
                raise Forbidden(f"{reason} (三权分立)", code=CoreCode.FORBIDDEN)
            await self._guard_admin_account(actor, user, "user.roles", info)
        await self.repo.set_roles(user.id, roles)
        self.cache.clear()
        await self.audit(actor.name, "user.roles", f"user:{name}", "success", info, {"old": old, "new": roles})

    # -- passwords ------------------------------------------------------------------------------------
    async def reset_password(self, actor: Principal, name: str, info: ReqInfo | None = None) -> str:
        """A new one-time password (must be changed at next login); the user's sessions are revoked."""
        user = await self.require(name)
        await self._guard_admin_account(actor, user, "user.password_reset", info)
        pw = passwords.generate_password()
        h = await self.credentials.hash_password(pw)
        await self.repo.reset_password(user.id, h, self.clock())
        await self.credentials.lockout.reset(identity_key(name))
        self.cache.clear()
        await self.audit(actor.name, "user.password_reset", f"user:{name}", "success", info)
        return pw

    async def change_password(self, principal: Principal, old: str, new: str, info: ReqInfo | None = None) -> None:
        if principal.kind != "user":
            raise Forbidden("API keys have no password", code=CoreCode.FORBIDDEN)
        cred = self.credentials
        user = await self.require(principal.name)
        key, resource = identity_key(principal.name), f"user:{principal.name}"
        await cred.refuse_if_locked(key, principal.name, "user.password_change", resource, info)
        if not await cred.verify_password(old, user.pw_hash):
            await cred.fail(key, principal.name, resource, info, "bad_old_password")
            await self.audit(principal.name, "user.password_change", resource, "failure", info,
                             {"reason": "bad_old_password"})
            raise InvalidCredentials("the current password is wrong")
        # the last N passwords, newest first (the current one included): an ordered list in the
        # user's row, so order never depends on timestamps
        history = [*(user.pw_history or ())] or ([user.pw_hash] if user.pw_hash else [])
        if user.pw_hash and user.pw_hash not in history:
            history.insert(0, user.pw_hash)
        try:
            passwords.check_policy(new, principal.name, self.settings.password_min_length,
                                   self.settings.password_min_classes)
            for h in history[: self.settings.password_history]:
                if await cred.verify_password(new, h):
                    raise passwords.PasswordPolicyError(
                        f"password must differ from the last {self.settings.password_history} passwords")
        except passwords.PasswordPolicyError as exc:
            await self.audit(principal.name, "user.password_change", resource, "failure", info,
                             {"reason": exc.message})
            raise
        h = await cred.hash_password(new)
        # other sessions of this user end; this one continues, unrestricted unless TOTP enrolment is due
        due = self.settings.totp_required and user.kind == "human" and not user.totp_enabled
        await self.repo.change_password(user.id, h, self.clock(), [h, *history][: self.settings.password_history],
                                        principal.session or "", "totp_enrollment" if due else None)
        self.cache.clear()
        await self.audit(principal.name, "user.password_change", resource, "success", info)

    # -- TOTP enrolment -------------------------------------------------------------------------------
    async def totp_begin(self, principal: Principal, info: ReqInfo | None = None) -> dict[str, str]:
        user = await self.require(principal.name)
        if user.totp_enabled:
            raise Conflict("TOTP is already enrolled; ask an administrator to reset it",
                           code=SecurityCode.TOTP_ENROLLED)
        secret = totp.new_secret()
        await self.repo.set_totp_secret(user.id, await self.credentials.seal_totp_secret(user, secret))
        uri = totp.provisioning_uri(secret, principal.name, self.settings.totp_issuer)
        await self.audit(principal.name, "user.totp_begin", f"user:{principal.name}", "success", info)
        return {"secret": secret, "otpauth_uri": uri, "qr": totp.terminal_qr(uri)}

    async def totp_confirm(self, principal: Principal, code: str, info: ReqInfo | None = None) -> list[str]:
        """Activate TOTP with a first valid code; returns the recovery codes (shown once, stored hashed)."""
        user = await self.require(principal.name)
        if user.totp_enabled or not user.totp_secret:
            raise Conflict("no TOTP enrolment in progress", code=SecurityCode.TOTP_NOT_PENDING)
        cred = self.credentials
        key, resource = identity_key(principal.name), f"user:{principal.name}"
        await cred.refuse_if_locked(key, principal.name, "user.totp_confirm", resource, info)
        malformed = not totp.is_code(totp.normalize(code))
        step = None if malformed else await cred.check_totp(user, code, self.clock())
        if step is None:
            await cred.fail(key, principal.name, resource, info, "malformed_totp" if malformed else "bad_totp",
                            "user.totp_confirm")
            raise BadRequest("invalid TOTP code", code=SecurityCode.INVALID_TOTP)
        codes = totp.new_recovery_codes(self.settings.recovery_codes)
        await self.repo.enable_totp(user.id, [totp.hash_recovery_code(c, user.id) for c in codes])
        self.cache.clear()
        await self.audit(principal.name, "user.totp_enabled", f"user:{principal.name}", "success", info)
        return codes

    async def totp_reset(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        user = await self.require(name)
        await self._guard_admin_account(actor, user, "user.totp_reset", info)
        await self.repo.reset_totp(user.id)
        self.cache.clear()
        await self.audit(actor.name, "user.totp_reset", f"user:{name}", "success", info)
