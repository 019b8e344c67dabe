"""The security service: users, passwords, TOTP, lockout, sessions, API keys, roles — free of HTTP.

Every decision is audited through the audit log (when one is attached): logins (success and
failure), lockouts, logouts, password changes, user/role/key administration and every denial.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from xcstack.errors import BadRequest, Conflict, Forbidden, NotFound, Overloaded, RateLimited, Unauthorized
from xcstack.security import passwords, totp
from xcstack.security.audit.log import AuditLog
from xcstack.security.audit.record import _BASE as _SM3_BASE
from xcstack.security.lockout import Lockout, identity_key
from xcstack.security.rbac import BUILTIN_ADMIN_ROLES, BUILTIN_ROLES, Role, allowed, check_custom_permissions
from xcstack.security.secretbox import SecretBox, zero
from xcstack.security.settings import SecuritySettings
from xcstack.security.store import MIGRATIONS
from xcstack.state.store import StateStore, Tx

T = TypeVar("T")
SESSION_PREFIX = "xcs_"
KEY_PREFIX = "xck_"
TOUCH_EVERY_S = 30.0  # last_seen is written at most this often per session (idle-timeout granularity)


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"


class AccountLocked(RateLimited):
    code = "account_locked"


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    roles: tuple[str, ...]
    kind: str = "user"  # user | api_key
    session: str | None = None  # token hash of the session
    restricted: str | None = None  # None | password_change | totp_enrollment
    owner_id: str | None = None  # an API key's user: what it may not do to itself, its key may not either

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "roles": list(self.roles), "kind": self.kind,
                "restricted": self.restricted}


SYSTEM = Principal("system", "system", (), kind="system")


@dataclass
class ReqInfo:
    ip: str | None = None
    request_id: str | None = None


def token_hash(token: str) -> str:
    h = _SM3_BASE.copy()
    h.update(token.encode())
    return h.finalize().hex()


def _glob_overlap(a: str, b: str) -> bool:
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


def _covers(perms: list[tuple[str, str]], res: str, act: str) -> bool:
    """Whether one of `perms` matches every string the pattern pair (res, act) can match (judged on the
    patterns as text: `*` covers `*`, `model:*` covers `model:a*`; unsure counts as not covered)."""
    return any(fnmatchcase(res, r) and fnmatchcase(act, a) for r, a in perms)


def _excess_right(creator: list[Role], new: list[Role]) -> str | None:
    """The first right the roles `new` grant that the roles `creator` do not (None: none). An allow of
    `new` must be covered by an allow of `creator`, and each deny of `creator` it may touch must be
    repeated by a deny of `new` (else a sysadmin holding a custom deny role escapes it with a key)."""
    c_allow = [p for r in creator for p in r.allow]
    c_deny = [p for r in creator for p in r.deny]
    n_deny = [p for r in new for p in r.deny]
    for role in new:
        for res, act in role.allow:
            if not _covers(c_allow, res, act):
                return f"{role.name}: {res} {act}"
            for dr, da in c_deny:
                if _glob_overlap(res, dr) and _glob_overlap(act, da) and not _covers(n_deny, dr, da):
                    return f"{role.name}: {res} {act}, which the creator is denied as {dr} {da}"
    return None


@dataclass
class _RoleCache:
    custom: dict[str, Role] = field(default_factory=dict)
    loaded_at: float = -1e18


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
        self.audit_log = audit
        self.clock = clock
        self._roles = _RoleCache()
        self.role_cache_ttl_s = 2.0
        # token hash -> (checked at, principal): bounds the state-store reads per request
        self._auth_cache: dict[str, tuple[float, Principal]] = {}
        self._kdf_slots = asyncio.Semaphore(max(2, os.cpu_count() or 1))
        self.kdf_wait_s = 5.0

    async def _kdf(self, fn: Callable[..., T], *args: Any) -> T:
        """Password hashing (tens of ms of CPU) in a thread, at most a few at once: a login flood
        gets 503 instead of starving the pool every request shares."""
        try:
            await asyncio.wait_for(self._kdf_slots.acquire(), self.kdf_wait_s)
        except TimeoutError:
            raise Overloaded("too many logins in progress; retry shortly", code="auth_overloaded",
                             retry_after=1) from None
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._kdf_slots.release()

    def forget_sessions(self) -> None:
        """Drop this process's authentication cache (after revocations and role changes)."""
        self._auth_cache.clear()

    async def init(self) -> None:
        await self.store.migrate("security", MIGRATIONS)

    # -- audit ------------------------------------------------------------------------------------
    async def audit(
        self,
        actor: str,
        action: str,
        resource: str,
        outcome: str,
        info: ReqInfo | None = None,
        detail: dict[str, Any] | None = None,
        *,
        data_plane: bool = False,
    ) -> None:
        """Write one audit record. Security events (the default) are durable before this returns;
        `data_plane` call records are queued in order and made durable within the configured window
        (`[security.audit] durability`, docs/security.md)."""
        if self.audit_log is None:
            return
        info = info or ReqInfo()
        append = self.audit_log.append_call if data_plane else self.audit_log.append
        await append(actor=actor, action=action, resource=resource, outcome=outcome, ip=info.ip,
                     request_id=info.request_id, detail=detail)

    # -- bootstrap ---------------------------------------------------------------------------------
    async def bootstrap(self) -> list[tuple[str, str, str]]:
        """On first start (no users): create the three administrators, each with a one-time password
        that must be changed at first login. Returns [(name, role, password)] — print once, never log."""
        names = [(self.settings.admin_user, "sysadmin"), ("secadmin", "secadmin"), ("auditor", "auditor")]
        now = self.clock()
        created: list[tuple[str, str, str]] = []
        prepared = []
        for name, role in names:
            pw = passwords.generate_password()
            h = await self._kdf(passwords.hash_password, pw, self.settings.password_hash,
                                        self.settings.pbkdf2_iterations)
            prepared.append((name, role, pw, h))

        def run(tx: Tx) -> bool:
            row = tx.fetchone("SELECT COUNT(*) AS n FROM sec_users")
            if row and int(row["n"]) > 0:
                return False
            for name, role, _, h in prepared:
                tx.execute(
                    "INSERT INTO sec_users (id, name, kind, roles, pw_hash, pw_changed_at, must_change, created_at)"
                    " VALUES (?, ?, 'human', ?, ?, ?, 1, ?)",
                    (uuid.uuid4().hex, name, json.dumps([role]), h, now, now),
                )
            return True

        try:
            made = await self.store.transaction(run)
        except Exception:  # another worker won the race (unique name)
            made = False
        if made:
            created = [(n, r, p) for n, r, p, _ in prepared]
            for name, role, _ in created:
                await self.audit("system", "user.bootstrap", f"user:{name}", "success", detail={"role": role})
        return created

    # -- users ---------------------------------------------------------------------------------------
    async def get_user(self, name: str) -> dict[str, Any] | None:
        return await self.store.fetchone("SELECT * FROM sec_users WHERE name = ?", (name,))

    async def list_users(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall("SELECT * FROM sec_users ORDER BY name")
        return [self.public_user(r) for r in rows]

    def public_user(self, r: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": r["id"], "name": r["name"], "kind": r["kind"], "roles": json.loads(r["roles"]),
            "disabled": bool(r["disabled"]), "must_change_password": bool(r["must_change"]),
            "totp_enabled": bool(r["totp_enabled"]), "created_at": r["created_at"],
            "password_changed_at": r["pw_changed_at"],
        }

    async def _check_roles(self, roles: list[str]) -> None:
        await self._load_roles(force=True)
        for r in roles:
            if r not in BUILTIN_ROLES and r not in self._roles.custom:
                raise BadRequest(f"unknown role {r!r}", code="unknown_role")
        if len([r for r in roles if r in BUILTIN_ADMIN_ROLES]) > 1:
            raise BadRequest("a user may hold at most one of sysadmin, secadmin, auditor (三权分立)",
                             code="separation_of_duties")

    async def create_user(
        self,
        actor: Principal,
        name: str,
        roles: list[str],
        kind: str = "human",
        password: str | None = None,
        info: ReqInfo | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        """Create a user; without `password` a one-time password is generated (returned once). Either way a
        password someone else chose is one-time: the account must change it at first login, like the
        first-start passwords. Only the in-process `system` principal (provisioning code, tests) sets a
        lasting password; the console CLI never passes one."""
        if kind not in ("human", "service"):
            raise BadRequest("kind must be 'human' or 'service'", code="invalid_parameter")
        if roles and actor.kind != "system" and not await self.is_allowed(actor, "security.role", "assign"):
            await self.audit(actor.name, "user.create", f"user:{name}", "denied", info,
                             {"reason": "role assignment needs security.role:assign", "roles": roles})
            raise Forbidden("assigning roles is the security administrator's right (三权分立)", code="forbidden")
        await self._check_roles(roles)
        one_time = None
        if password is None:
            password = one_time = passwords.generate_password()
        else:
            passwords.check_policy(password, name, self.settings.password_min_length,
                                   self.settings.password_min_classes)
        h = await self._kdf(passwords.hash_password, password, self.settings.password_hash,
                                    self.settings.pbkdf2_iterations)
        now = self.clock()
        uid = uuid.uuid4().hex

        def run(tx: Tx) -> None:
            if tx.fetchone("SELECT id FROM sec_users WHERE name = ?", (name,)):
                raise Conflict(f"user {name!r} exists", code="user_exists")
            tx.execute(
                "INSERT INTO sec_users (id, name, kind, roles, pw_hash, pw_changed_at, must_change, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (uid, name, kind, json.dumps(roles), h, now, 0 if actor == SYSTEM and not one_time else 1, now),
            )
            tx.execute("UPDATE sec_users SET pw_history = ? WHERE id = ?", (json.dumps([h]), uid))

        try:
            await self.store.transaction(run)
        except Conflict:
            await self.audit(actor.name, "user.create", f"user:{name}", "failure", info, {"reason": "exists"})
            raise
        await self.audit(actor.name, "user.create", f"user:{name}", "success", info, {"roles": roles, "kind": kind})
        user = await self.get_user(name)
        assert user is not None
        return self.public_user(user), one_time

    async def _require_user(self, name: str) -> dict[str, Any]:
        user = await self.get_user(name)
        if user is None:
            raise NotFound(f"no user {name!r}", code="user_not_found")
        return user

    async def _guard_admin_account(self, actor: Principal, user: dict[str, Any], action: str,
                                   info: ReqInfo | None) -> None:
        """三权分立: an account holding sysadmin, secadmin or auditor cannot be taken over through the
        API by another administrator (a reset password would be handed to the resetter). Those
        accounts are managed from the server console (`xcstack user ...`, actor `cli:<os user>`)."""
        roles = set(json.loads(user["roles"]))
        if actor.kind == "system" or actor.id == user["id"] or not roles & set(BUILTIN_ADMIN_ROLES):
            return
        await self.audit(actor.name, action, f"user:{user['name']}", "denied", info,
                         {"reason": "administrator account", "roles": sorted(roles)})
        raise Forbidden("accounts of the sysadmin, secadmin and auditor roles are managed from the server "
                        "console (xcstack user ...), not through the API (三权分立)", code="forbidden")

    async def set_disabled(self, actor: Principal, name: str, disabled: bool, info: ReqInfo | None = None) -> None:
        user = await self._require_user(name)
        await self._guard_admin_account(actor, user, "user.disable" if disabled else "user.enable", info)
        if actor.id == user["id"] and disabled:
            raise BadRequest("you cannot disable yourself", code="invalid_parameter")

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET disabled = ? WHERE id = ?", (1 if disabled else 0, user["id"]))
            if disabled:  # revoke every session at once
                tx.execute("DELETE FROM sec_sessions WHERE user_id = ?", (user["id"],))

        await self.store.transaction(run)
        self.forget_sessions()
        await self.audit(actor.name, "user.disable" if disabled else "user.enable", f"user:{name}", "success", info)

    async def delete_user(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        user = await self._require_user(name)
        await self._guard_admin_account(actor, user, "user.delete", info)
        if actor.id == user["id"]:
            raise BadRequest("you cannot delete yourself", code="invalid_parameter")

        def run(tx: Tx) -> None:
            for sql in ("DELETE FROM sec_sessions WHERE user_id = ?",
                        "UPDATE sec_api_keys SET revoked = 1 WHERE owner_id = ?", "DELETE FROM sec_users WHERE id = ?"):
                tx.execute(sql, (user["id"],))

        await self.store.transaction(run)
        self.forget_sessions()
        await self.audit(actor.name, "user.delete", f"user:{name}", "success", info)

    async def set_roles(self, actor: Principal, name: str, roles: list[str], info: ReqInfo | None = None) -> None:
        """三权分立 through the API: nobody changes their own roles, the built-in administrator roles are
        granted and taken away only from the server console, and an administrator account's roles are not
        changed by another administrator (the secadmin would otherwise make itself sysadmin, give itself
        operational rights, or strip the auditor)."""
        user = await self._require_user(name)
        await self._check_roles(roles)
        if actor.kind != "system":
            old = set(json.loads(user["roles"]))
            reason = ""
            if user["id"] in (actor.id, actor.owner_id):
                reason = "you cannot change your own roles"
            elif (set(roles) ^ old) & set(BUILTIN_ADMIN_ROLES):
                reason = ("the sysadmin, secadmin and auditor roles are granted and removed from the server "
                          "console (xcstack user set-roles ...), not through the API")
            if reason:
                await self.audit(actor.name, "user.roles", f"user:{name}", "denied", info,
                                 {"reason": reason, "old": sorted(old), "new": roles})
                raise Forbidden(f"{reason} (三权分立)", code="forbidden")
            await self._guard_admin_account(actor, user, "user.roles", info)
        await self.store.execute("UPDATE sec_users SET roles = ? WHERE id = ?", (json.dumps(roles), user["id"]))
        self.forget_sessions()
        await self.audit(actor.name, "user.roles", f"user:{name}", "success", info,
                         {"old": json.loads(user["roles"]), "new": roles})

    async def reset_password(self, actor: Principal, name: str, info: ReqInfo | None = None) -> str:
        """A new one-time password (must be changed at next login); the user's sessions are revoked."""
        user = await self._require_user(name)
        await self._guard_admin_account(actor, user, "user.password_reset", info)
        pw = passwords.generate_password()
        h = await self._kdf(passwords.hash_password, pw, self.settings.password_hash,
                                    self.settings.pbkdf2_iterations)
        now = self.clock()

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET pw_hash = ?, pw_changed_at = ?, must_change = 1 WHERE id = ?",
                       (h, now, user["id"]))
            tx.execute("DELETE FROM sec_sessions WHERE user_id = ?", (user["id"],))

        await self.store.transaction(run)
        await self.lockout.reset(identity_key(name))
        self.forget_sessions()
        await self.audit(actor.name, "user.password_reset", f"user:{name}", "success", info)
        return pw

    # -- login -----------------------------------------------------------------------------------------
    async def login(
        self,
        username: str,
        password: str,
        totp_code: str | None = None,
        recovery_code: str | None = None,
        info: ReqInfo | None = None,
    ) -> dict[str, Any]:
        key = identity_key(username)
        resource = f"user:{username[:64]}"
        locked = await self.lockout.locked_for(key)
        if locked > 0:
            await self.audit(username[:64], "auth.login", resource, "denied", info, {"reason": "locked"})
            raise AccountLocked("too many failed attempts; the account is locked", retry_after=locked)
        user = await self.get_user(username)
        stored = user["pw_hash"] if user and user["pw_hash"] else passwords.dummy_hash(
            self.settings.password_hash, self.settings.pbkdf2_iterations)
        ok = await self._kdf(passwords.verify_password, password, stored)
        if not ok or user is None or user["disabled"]:
            await self._fail(key, username, resource, info, "bad_password" if user else "unknown_user")
            raise InvalidCredentials("invalid user name or password")
        restricted: str | None = None
        now = self.clock()
        if user["totp_enabled"]:
            # every second-factor attempt, malformed ones included, is audited and counts toward the lockout
            if not totp_code and not recovery_code:
                await self._fail(key, username, resource, info, "totp_missing")
                raise Unauthorized("a TOTP code (or a recovery code) is required", code="totp_required")
            if totp_code:
                if not totp.is_code(totp.normalize(totp_code)):
                    await self._fail(key, username, resource, info, "malformed_totp")
                    raise InvalidCredentials("invalid or already used TOTP code", code="invalid_totp")
                step = await self._totp_check(user, totp_code, now)
                if step is None:
                    await self._fail(key, username, resource, info, "bad_totp")
                    raise InvalidCredentials("invalid or already used TOTP code", code="invalid_totp")
            else:
                assert recovery_code is not None
                if not totp.is_recovery_code(recovery_code):
                    await self._fail(key, username, resource, info, "malformed_recovery_code")
                    raise InvalidCredentials("invalid recovery code", code="invalid_totp")
                if not await self._use_recovery(user, recovery_code):
                    await self._fail(key, username, resource, info, "bad_recovery_code")
                    raise InvalidCredentials("invalid recovery code", code="invalid_totp")
        elif self.settings.totp_required and user["kind"] == "human":
            restricted = "totp_enrollment"
        expired = now - float(user["pw_changed_at"]) > self.settings.password_max_age_days * 86400
        if user["must_change"] or expired:
            restricted = "password_change"
        await self.lockout.reset(key)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)  # 256 bits
        await self.store.execute(
            "INSERT INTO sec_sessions (token_hash, user_id, created_at, last_seen, restricted) VALUES (?, ?, ?, ?, ?)",
            (token_hash(token), user["id"], now, now, restricted),
        )
        await self.audit(username, "auth.login", resource, "success", info,
                         {"restricted": restricted} if restricted else None)
        return {
            "token": token, "token_type": "bearer", "idle_timeout_s": self.settings.session_idle_s,
            "expires_at": now + self.settings.session_absolute_s, "restricted": restricted,
            "password_expired": bool(expired),
        }

    async def _fail(self, key: str, username: str, resource: str, info: ReqInfo | None, reason: str,
                    action: str = "auth.login") -> None:
        """Count one failed authentication toward the lockout and audit it (and the lock it may start)."""
        locked = await self.lockout.failure(key)
        await self.audit(username[:64], action, resource, "failure", info, {"reason": reason})
        if locked > 0:
            await self.audit("system", "auth.lockout", resource, "success", info,
                             {"lock_s": round(locked, 1), "threshold": self.settings.lockout_threshold})

    async def _refuse_if_locked(self, key: str, actor: str, action: str, resource: str,
                                info: ReqInfo | None) -> None:
        """A locked identity may not keep guessing through the self-service routes either."""
        locked = await self.lockout.locked_for(key)
        if locked > 0:
            await self.audit(actor[:64], action, resource, "denied", info, {"reason": "locked"})
            raise AccountLocked("too many failed attempts; the account is locked", retry_after=locked)

    async def _totp_secret(self, user: dict[str, Any]) -> str:
        buf = await self.box.open(base64.b64decode(user["totp_secret"]), b"totp:" + user["id"].encode())
        try:
            return buf.decode()  # pyotp needs a str: cannot be wiped (documented)
        finally:
            zero(buf)

    async def _totp_check(self, user: dict[str, Any], code: str, now: float) -> int | None:
        secret = await self._totp_secret(user)
        step = totp.verify(secret, code, now, int(user["totp_last_step"]))
        if step is None:
            return None
        # compare-and-set: two concurrent logins with the same code cannot both win
        n = await self.store.execute(
            "UPDATE sec_users SET totp_last_step = ? WHERE id = ? AND totp_last_step < ?", (step, user["id"], step)
        )
        return step if n == 1 else None

    async def _use_recovery(self, user: dict[str, Any], code: str) -> bool:
        stored = json.loads(user["recovery"] or "[]")
        h = totp.hash_recovery_code(code, user["id"])
        match = [x for x in stored if hmac.compare_digest(x, h)]
        if not match:
            return False
        rest = [x for x in stored if x != match[0]]
        n = await self.store.execute("UPDATE sec_users SET recovery = ? WHERE id = ? AND recovery = ?",
                                     (json.dumps(rest), user["id"], user["recovery"]))
        return n == 1

    # -- sessions ----------------------------------------------------------------------------------------
    async def authenticate(self, token: str) -> Principal | None:
        """The principal of a bearer token (session or API key), or None.

        A successful check is cached in this process for `auth_cache_s` (default 1 s), so a busy
        client costs one state-store read per second, not one per request. Revocations made in this
        process clear the cache at once; other workers and nodes see them within `auth_cache_s`."""
        if len(token) > 128 or not token.startswith((KEY_PREFIX, SESSION_PREFIX)):
            return None
        th = token_hash(token)
        now = self.clock()
        ttl = self.settings.auth_cache_s
        hit = self._auth_cache.get(th)
        if hit is not None and 0 <= now - hit[0] < ttl:
            return hit[1]
        principal = await (self._auth_key(token) if token.startswith(KEY_PREFIX) else self._auth_session(th))
        if principal is None:
            self._auth_cache.pop(th, None)
        elif ttl > 0:
            if len(self._auth_cache) >= 100_000:
                self._auth_cache.clear()
            self._auth_cache[th] = (now, principal)
        return principal

    async def _auth_session(self, th: str) -> Principal | None:
        row = await self.store.fetchone(
            "SELECT s.user_id, s.created_at, s.last_seen, s.restricted, u.name, u.roles, u.disabled "
            "FROM sec_sessions s JOIN sec_users u ON u.id = s.user_id WHERE s.token_hash = ?", (th,)
        )
        if row is None:
            return None
        now = self.clock()
        if (
            row["disabled"]
            or now - float(row["last_seen"]) > self.settings.session_idle_s
            or now - float(row["created_at"]) > self.settings.session_absolute_s
        ):
            await self.store.execute("DELETE FROM sec_sessions WHERE token_hash = ?", (th,))
            return None
        if now - float(row["last_seen"]) >= min(TOUCH_EVERY_S, self.settings.session_idle_s / 4):
            await self.store.execute("UPDATE sec_sessions SET last_seen = ? WHERE token_hash = ?", (now, th))
        return Principal(row["user_id"], row["name"], tuple(json.loads(row["roles"])), "user", th, row["restricted"])

    async def logout(self, principal: Principal, info: ReqInfo | None = None) -> None:
        if principal.session:
            await self.store.execute("DELETE FROM sec_sessions WHERE token_hash = ?", (principal.session,))
        self.forget_sessions()
        await self.audit(principal.name, "auth.logout", f"user:{principal.name}", "success", info)

    async def change_password(self, principal: Principal, old: str, new: str, info: ReqInfo | None = None) -> None:
        if principal.kind != "user":
            raise Forbidden("API keys have no password", code="forbidden")
        user = await self._require_user(principal.name)
        resource = f"user:{principal.name}"
        await self._refuse_if_locked(identity_key(principal.name), principal.name, "user.password_change", resource,
                                     info)
        if not await self._kdf(passwords.verify_password, old, user["pw_hash"]):
            await self._fail(identity_key(principal.name), principal.name, resource, info, "bad_old_password")
            await self.audit(principal.name, "user.password_change", resource, "failure", info,
                             {"reason": "bad_old_password"})
            raise InvalidCredentials("the current password is wrong")
        try:
            passwords.check_policy(new, principal.name, self.settings.password_min_length,
                                   self.settings.password_min_classes)
            # the last N passwords, newest first (the current one included): an ordered list in the
            # user's row, so order never depends on timestamps
            history: list[str] = json.loads(user.get("pw_history") or "[]") or [user["pw_hash"]]
            if user["pw_hash"] not in history:
                history.insert(0, user["pw_hash"])
            for h in history[: self.settings.password_history]:
                if await self._kdf(passwords.verify_password, new, h):
                    raise passwords.PasswordPolicyError(
                        f"password must differ from the last {self.settings.password_history} passwords")
        except passwords.PasswordPolicyError as exc:
            await self.audit(principal.name, "user.password_change", resource, "failure", info,
                             {"reason": exc.message})
            raise
        h = await self._kdf(passwords.hash_password, new, self.settings.password_hash,
                                    self.settings.pbkdf2_iterations)
        now = self.clock()
        keep = self.settings.password_history

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET pw_hash = ?, pw_changed_at = ?, must_change = 0 WHERE id = ?",
                       (h, now, user["id"]))
            tx.execute("UPDATE sec_users SET pw_history = ? WHERE id = ?",
                       (json.dumps([h, *history][:keep]), user["id"]))
            # other sessions of this user end; this one continues, unrestricted unless TOTP enrolment is due
            tx.execute("DELETE FROM sec_sessions WHERE user_id = ? AND token_hash <> ?",
                       (user["id"], principal.session or ""))
            nxt = "totp_enrollment" if (self.settings.totp_required and user["kind"] == "human"
                                        and not user["totp_enabled"]) else None
            tx.execute("UPDATE sec_sessions SET restricted = ? WHERE token_hash = ?", (nxt, principal.session or ""))

        await self.store.transaction(run)
        self.forget_sessions()
        await self.audit(principal.name, "user.password_change", resource, "success", info)

    # -- TOTP enrolment -----------------------------------------------------------------------------------
    async def totp_begin(self, principal: Principal, info: ReqInfo | None = None) -> dict[str, str]:
        user = await self._require_user(principal.name)
        if user["totp_enabled"]:
            raise Conflict("TOTP is already enrolled; ask an administrator to reset it", code="totp_enrolled")
        secret = totp.new_secret()
        sealed = await self.box.seal(secret.encode(), b"totp:" + user["id"].encode())
        await self.store.execute("UPDATE sec_users SET totp_secret = ? WHERE id = ?",
                                 (base64.b64encode(sealed).decode(), user["id"]))
        uri = totp.provisioning_uri(secret, principal.name, self.settings.totp_issuer)
        await self.audit(principal.name, "user.totp_begin", f"user:{principal.name}", "success", info)
        return {"secret": secret, "otpauth_uri": uri, "qr": totp.terminal_qr(uri)}

    async def totp_confirm(self, principal: Principal, code: str, info: ReqInfo | None = None) -> list[str]:
        """Activate TOTP with a first valid code; returns the recovery codes (shown once, stored hashed)."""
        user = await self._require_user(principal.name)
        if user["totp_enabled"] or not user["totp_secret"]:
            raise Conflict("no TOTP enrolment in progress", code="totp_not_pending")
        key, resource = identity_key(principal.name), f"user:{principal.name}"
        await self._refuse_if_locked(key, principal.name, "user.totp_confirm", resource, info)
        malformed = not totp.is_code(totp.normalize(code))
        step = None if malformed else await self._totp_check(user, code, self.clock())
        if step is None:
            await self._fail(key, principal.name, resource, info, "malformed_totp" if malformed else "bad_totp",
                             "user.totp_confirm")
            raise BadRequest("invalid TOTP code", code="invalid_totp")
        codes = totp.new_recovery_codes(self.settings.recovery_codes)
        hashed = [totp.hash_recovery_code(c, user["id"]) for c in codes]

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET totp_enabled = 1, recovery = ? WHERE id = ?",
                       (json.dumps(hashed), user["id"]))
            tx.execute("UPDATE sec_sessions SET restricted = NULL WHERE user_id = ? AND restricted = ?",
                       (user["id"], "totp_enrollment"))

        await self.store.transaction(run)
        self.forget_sessions()
        await self.audit(principal.name, "user.totp_enabled", f"user:{principal.name}", "success", info)
        return codes

    async def totp_reset(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        user = await self._require_user(name)
        await self._guard_admin_account(actor, user, "user.totp_reset", info)
        await self.store.execute(
            "UPDATE sec_users SET totp_enabled = 0, totp_secret = NULL, recovery = NULL, totp_last_step = 0 "
            "WHERE id = ?", (user["id"],))
        await self.store.execute("DELETE FROM sec_sessions WHERE user_id = ?", (user["id"],))
        self.forget_sessions()
        await self.audit(actor.name, "user.totp_reset", f"user:{name}", "success", info)

    # -- API keys ----------------------------------------------------------------------------------------
    async def create_api_key(
        self, actor: Principal, name: str, roles: list[str], days: int | None = None, info: ReqInfo | None = None
    ) -> dict[str, Any]:
        """Issue a key owned by the creating user; a key created with an API key belongs to that key's
        owner (a key is never the owner of a key: `_auth_key` joins the owner to `sec_users`), carries no
        right its creator lacks and does not outlive it."""
        await self._check_roles(roles)
        reason = None
        for r in roles:
            if r in BUILTIN_ROLES and r not in actor.roles:
                reason = f"you cannot issue a key with role {r!r} that you do not hold"
                break
        else:
            excess = _excess_right(self._roles_of(actor), [BUILTIN_ROLES.get(r) or self._roles.custom[r]
                                                           for r in roles])
            if excess:
                reason = f"a key cannot carry rights its creator lacks ({excess})"
        if reason:
            await self.audit(actor.name, "apikey.create", f"apikey:{name}", "denied", info,
                             {"reason": reason, "roles": roles})
            raise Forbidden(reason, code="forbidden")
        days = days or self.settings.api_key_max_days
        if not 1 <= days <= self.settings.api_key_max_days:
            raise BadRequest(f"days must be 1..{self.settings.api_key_max_days}", code="invalid_parameter")
        now = self.clock()
        expires = now + days * 86400
        owner = actor.id
        if actor.kind == "api_key":
            row = await self.store.fetchone("SELECT owner_id, expires_at FROM sec_api_keys WHERE id = ?",
                                            (actor.id.removeprefix("apikey:"),))
            if row is None or actor.owner_id is None:
                await self.audit(actor.name, "apikey.create", f"apikey:{name}", "denied", info,
                                 {"reason": "the creating key no longer exists"})
                raise Forbidden("the API key this request was made with no longer exists", code="forbidden")
            owner = actor.owner_id
            expires = min(expires, float(row["expires_at"]))
        kid = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        token = f"{KEY_PREFIX}{kid}_{secret}"
        await self.store.execute(
            "INSERT INTO sec_api_keys (id, name, key_hash, owner_id, roles, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (kid, name, token_hash(token), owner, json.dumps(roles), now, expires),
        )
        await self.audit(actor.name, "apikey.create", f"apikey:{kid}", "success", info,
                         {"name": name, "roles": roles, "days": days, "owner_id": owner})
        return {"id": kid, "name": name, "roles": roles, "expires_at": expires, "key": token}

    async def list_api_keys(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall("SELECT * FROM sec_api_keys ORDER BY created_at")
        return [{"id": r["id"], "name": r["name"], "roles": json.loads(r["roles"]), "owner_id": r["owner_id"],
                 "created_at": r["created_at"], "expires_at": r["expires_at"], "revoked": bool(r["revoked"])}
                for r in rows]

    async def revoke_api_key(self, actor: Principal, kid: str, info: ReqInfo | None = None) -> None:
        n = await self.store.execute("UPDATE sec_api_keys SET revoked = 1 WHERE id = ?", (kid,))
        if n == 0:
            raise NotFound(f"no API key {kid!r}", code="apikey_not_found")
        self.forget_sessions()
        await self.audit(actor.name, "apikey.revoke", f"apikey:{kid}", "success", info)

    async def _auth_key(self, token: str) -> Principal | None:
        parts = token[len(KEY_PREFIX):].split("_", 1)
        if len(parts) != 2 or len(token) > 128:
            return None
        row = await self.store.fetchone(
            "SELECT k.*, u.disabled FROM sec_api_keys k JOIN sec_users u ON u.id = k.owner_id WHERE k.id = ?",
            (parts[0],),
        )
        if row is None or not hmac.compare_digest(row["key_hash"], token_hash(token)):
            return None
        if row["revoked"] or row["disabled"] or self.clock() >= float(row["expires_at"]):
            return None
        return Principal(f"apikey:{row['id']}", f"apikey:{row['name']}", tuple(json.loads(row["roles"])), "api_key",
                         owner_id=row["owner_id"])

    # -- roles -------------------------------------------------------------------------------------------
    async def _load_roles(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._roles.loaded_at < self.role_cache_ttl_s:
            return
        rows = await self.store.fetchall("SELECT * FROM sec_roles")
        self._roles.custom = {
            r["name"]: Role(r["name"], tuple(tuple(p) for p in json.loads(r["allow_perms"])),  # type: ignore[misc]
                            tuple(tuple(p) for p in json.loads(r["deny_perms"])),  # type: ignore[misc]
                            False, r["description"])
            for r in rows
        }
        self._roles.loaded_at = now

    async def list_roles(self) -> list[dict[str, Any]]:
        await self._load_roles(force=True)
        return [r.to_dict() for r in [*BUILTIN_ROLES.values(), *self._roles.custom.values()]]

    async def create_role(
        self,
        actor: Principal,
        name: str,
        allow: list[tuple[str, str]],
        deny: list[tuple[str, str]] | None = None,
        description: str = "",
        info: ReqInfo | None = None,
    ) -> dict[str, Any]:
        if name in BUILTIN_ROLES:
            raise Conflict(f"{name!r} is a built-in role", code="role_exists")
        try:
            check_custom_permissions(allow)
        except ValueError as exc:
            await self.audit(actor.name, "role.create", f"role:{name}", "denied", info, {"reason": str(exc)})
            raise BadRequest(str(exc), code="separation_of_duties") from None
        deny = deny or []

        def run(tx: Tx) -> None:
            if tx.fetchone("SELECT name FROM sec_roles WHERE name = ?", (name,)):
                raise Conflict(f"role {name!r} exists", code="role_exists")
            tx.execute("INSERT INTO sec_roles (name, allow_perms, deny_perms, description, created_at) "
                       "VALUES (?, ?, ?, ?, ?)", (name, json.dumps(allow), json.dumps(deny), description, self.clock()))

        await self.store.transaction(run)
        await self._load_roles(force=True)
        await self.audit(actor.name, "role.create", f"role:{name}", "success", info, {"allow": allow, "deny": deny})
        return self._roles.custom[name].to_dict()

    async def delete_role(self, actor: Principal, name: str, info: ReqInfo | None = None) -> None:
        if name in BUILTIN_ROLES:
            raise BadRequest(f"{name!r} is a built-in role", code="builtin_role")
        n = await self.store.execute("DELETE FROM sec_roles WHERE name = ?", (name,))
        if n == 0:
            raise NotFound(f"no role {name!r}", code="role_not_found")
        await self._load_roles(force=True)
        await self.audit(actor.name, "role.delete", f"role:{name}", "success", info)

    async def is_allowed(self, principal: Principal, resource: str, action: str) -> bool:
        await self._load_roles()
        return allowed(self._roles_of(principal), resource, action)

    def _roles_of(self, principal: Principal) -> list[Role]:
        out = []
        for n in principal.roles:
            r = BUILTIN_ROLES.get(n) or self._roles.custom.get(n)
            if r is not None:
                out.append(r)
        return out
