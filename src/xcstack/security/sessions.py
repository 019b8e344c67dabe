"""Sessions: login (password, second factor, lockout), logout, and turning a bearer token (session or
API key) into a principal, with idle and absolute timeouts and a short per-process cache."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from xcstack.crypto.recipes import sm3
from xcstack.errors import CoreCode, NotFound, Unauthorized
from xcstack.security import totp
from xcstack.security.apikeys import ApiKeys
from xcstack.security.auditor import Auditor
from xcstack.security.credentials import AccountLocked, Credentials, InvalidCredentials
from xcstack.security.lockout import identity_key
from xcstack.security.principal import Principal, ReqInfo
from xcstack.security.protocol import SecurityCode
from xcstack.security.repository import SecurityRepository, UserRow
from xcstack.security.settings import SecuritySettings
from xcstack.security.tokens import (
    KEY_PREFIX,
    MAX_TOKEN_LEN,
    SESSION_PREFIX,
    AuthCache,
    new_session_token,
    token_hash,
)

TOUCH_EVERY_S = 30.0  # last_seen is written at most this often per session (idle-timeout granularity)


def session_id(th: str) -> str:
    """The id under which a session is listed and ended: derived from its token hash, so the list
    shows neither the token nor the hash the store finds it by."""
    return sm3(b"xcstack-session-id:" + th.encode()).hex()[:24]


class Sessions:
    def __init__(self, settings: SecuritySettings, repo: SecurityRepository, credentials: Credentials,
                 keys: ApiKeys, cache: AuthCache, audit: Auditor, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.repo = repo
        self.credentials = credentials
        self.keys = keys
        self.cache = cache
        self.audit = audit
        self.clock = clock

    async def login(self, username: str, password: str, totp_code: str | None = None,
                    recovery_code: str | None = None, info: ReqInfo | None = None) -> dict[str, Any]:
        cred = self.credentials
        key = identity_key(username)
        resource = f"user:{username[:64]}"
        locked = await cred.lockout.locked_for(key)
        if locked > 0:
            await self.audit(username[:64], "auth.login", resource, "denied", info, {"reason": "locked"})
            raise AccountLocked("too many failed attempts; the account is locked", retry_after=locked)
        user = await self.repo.user(username)
        ok = await cred.verify_password(password, user.pw_hash if user else None)
        if not ok or user is None or user.disabled:
            await cred.fail(key, username, resource, info, "bad_password" if user else "unknown_user")
            raise InvalidCredentials("invalid user name or password")
        restricted: str | None = None
        now = self.clock()
        if user.totp_enabled:
            await self._second_factor(user, key, resource, totp_code, recovery_code, now, info)
        elif self.settings.totp_required and user.kind == "human":
            restricted = "totp_enrollment"
        expired = now - user.pw_changed_at > self.settings.password_max_age_days * 86400
        if user.must_change or expired:
            restricted = "password_change"
        await cred.lockout.reset(key)
        token = new_session_token()
        await self.repo.insert_session(token_hash(token), user.id, now, restricted, info.ip if info else None)
        await self.audit(username, "auth.login", resource, "success", info,
                         {"restricted": restricted} if restricted else None)
        return {
            "token": token, "token_type": "bearer", "idle_timeout_s": self.settings.session_idle_s,
            "expires_at": now + self.settings.session_absolute_s, "restricted": restricted,
            "password_expired": bool(expired),
        }

    async def _second_factor(self, user: UserRow, key: str, resource: str, totp_code: str | None,
                             recovery_code: str | None, now: float, info: ReqInfo | None) -> None:
        """Every second-factor attempt, malformed ones included, is audited and counts toward the lockout."""
        cred, username = self.credentials, user.name
        if not totp_code and not recovery_code:
            await cred.fail(key, username, resource, info, "totp_missing")
            raise Unauthorized("a TOTP code (or a recovery code) is required", code=SecurityCode.TOTP_REQUIRED)
        if totp_code:
            if not totp.is_code(totp.normalize(totp_code)):
                await cred.fail(key, username, resource, info, "malformed_totp")
                raise InvalidCredentials("invalid or already used TOTP code", code=SecurityCode.INVALID_TOTP)
            if await cred.check_totp(user, totp_code, now) is None:
                await cred.fail(key, username, resource, info, "bad_totp")
                raise InvalidCredentials("invalid or already used TOTP code", code=SecurityCode.INVALID_TOTP)
            return
        assert recovery_code is not None
        if not totp.is_recovery_code(recovery_code):
            await cred.fail(key, username, resource, info, "malformed_recovery_code")
            raise InvalidCredentials("invalid recovery code", code=SecurityCode.INVALID_TOTP)
        if not await cred.use_recovery(user, recovery_code):
            await cred.fail(key, username, resource, info, "bad_recovery_code")
            raise InvalidCredentials("invalid recovery code", code=SecurityCode.INVALID_TOTP)

    async def logout(self, principal: Principal, info: ReqInfo | None = None) -> None:
        if principal.session:
            await self.repo.delete_session(principal.session)
        self.cache.clear()
        await self.audit(principal.name, "auth.logout", f"user:{principal.name}", "success", info)

    def _live(self, created_at: float, last_seen: float, now: float) -> bool:
        return (now - last_seen <= self.settings.session_idle_s
                and now - created_at <= self.settings.session_absolute_s)

    async def list_active(self) -> list[dict[str, Any]]:
        """The sessions within their idle and absolute timeouts: an id derived from the token hash
        (never the token, nor the hash the store looks it up by), user, created, last seen, ip.
        `last_seen` is written at most every TOUCH_EVERY_S seconds."""
        now = self.clock()
        return [{"id": session_id(r["token_hash"]), "user": r["name"], "created_at": float(r["created_at"]),
                 "last_seen": float(r["last_seen"]), "ip": r["ip"], "restricted": r["restricted"]}
                for r in await self.repo.sessions()
                if not r["disabled"] and self._live(float(r["created_at"]), float(r["last_seen"]), now)]

    async def end(self, actor: Principal, sid: str, info: ReqInfo | None = None) -> None:
        """End another session now: deleted from the store and dropped from this process's
        authentication cache (other workers stop taking it within `auth_cache_s`). Audited."""
        for r in await self.repo.sessions():
            if hmac.compare_digest(session_id(r["token_hash"]), sid):
                await self.repo.delete_session(r["token_hash"])
                self.cache.drop(r["token_hash"])
                await self.audit(actor.name, "session.end", f"user:{r['name']}", "success", info,
                                 {"session": sid})
                return
        raise NotFound(f"no session {sid!r}", code=CoreCode.NOT_FOUND)

    async def authenticate(self, token: str) -> Principal | None:
        """The principal of a bearer token (session or API key), or None.

        A successful check is cached in this process for `auth_cache_s` (default 1 s), so a busy
        client costs one state-store read per second, not one per request. Revocations made in this
        process clear the cache at once; other workers and nodes see them within `auth_cache_s`."""
        if len(token) > MAX_TOKEN_LEN or not token.startswith((KEY_PREFIX, SESSION_PREFIX)):
            return None
        th = token_hash(token)
        now = self.clock()
        ttl = self.settings.auth_cache_s
        hit = self.cache.get(th, now, ttl)
        if hit is not None:
            return hit
        principal = await (self.keys.principal(token) if token.startswith(KEY_PREFIX) else self._session(th))
        if principal is None:
            self.cache.drop(th)
        elif ttl > 0:
            self.cache.put(th, now, principal)
        return principal

    async def _session(self, th: str) -> Principal | None:
        row = await self.repo.session(th)
        if row is None:
            return None
        now = self.clock()
        if (
            row.disabled
            or now - row.last_seen > self.settings.session_idle_s
            or now - row.created_at > self.settings.session_absolute_s
        ):
            await self.repo.delete_session(th)
            return None
        if now - row.last_seen >= min(TOUCH_EVERY_S, self.settings.session_idle_s / 4):
            await self.repo.touch_session(th, now)
        return Principal(row.user_id, row.name, row.roles, "user", th, row.restricted, group=row.group)
