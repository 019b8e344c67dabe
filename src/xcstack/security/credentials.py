"""Checking what a person presents: passwords (bounded KDF work), TOTP codes, recovery codes, and the
lockout every failed attempt counts toward. Shared by login (sessions) and self-service (accounts)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
from collections.abc import Callable
from typing import Any, TypeVar

from xcstack.errors import Overloaded, RateLimited, Unauthorized
from xcstack.security import passwords, totp
from xcstack.security.auditor import Auditor
from xcstack.security.lockout import Lockout
from xcstack.security.principal import ReqInfo
from xcstack.security.protocol import SecurityCode
from xcstack.security.repository import SecurityRepository, UserRow
from xcstack.security.secretbox import SecretBox, zero
from xcstack.security.settings import SecuritySettings

T = TypeVar("T")


class InvalidCredentials(Unauthorized):
    code = SecurityCode.INVALID_CREDENTIALS


class AccountLocked(RateLimited):
    code = SecurityCode.ACCOUNT_LOCKED


class KdfPool:
    """Password hashing (tens of ms of CPU) in a thread, at most a few at once: a login flood gets 503
    instead of starving the pool every request shares."""

    def __init__(self, slots: int | None = None, wait_s: float = 5.0) -> None:
        self.slots = asyncio.Semaphore(slots or max(2, os.cpu_count() or 1))
        self.wait_s = wait_s

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            await asyncio.wait_for(self.slots.acquire(), self.wait_s)
        except TimeoutError:
            raise Overloaded("too many logins in progress; retry shortly", code=SecurityCode.AUTH_OVERLOADED,
                             retry_after=1) from None
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.slots.release()


class Credentials:
    def __init__(self, settings: SecuritySettings, repo: SecurityRepository, box: SecretBox, lockout: Lockout,
                 kdf: KdfPool, audit: Auditor) -> None:
        self.settings = settings
        self.repo = repo
        self.box = box
        self.lockout = lockout
        self.kdf = kdf
        self.audit = audit

    # -- passwords ------------------------------------------------------------------------------------
    async def hash_password(self, password: str) -> str:
        return await self.kdf.run(passwords.hash_password, password, self.settings.password_hash,
                                  self.settings.pbkdf2_iterations)

    async def verify_password(self, password: str, stored: str | None) -> bool:
        """Against a dummy hash when there is none, so an unknown user costs the same time as a known one."""
        stored = stored or passwords.dummy_hash(self.settings.password_hash, self.settings.pbkdf2_iterations)
        return await self.kdf.run(passwords.verify_password, password, stored)

    # -- lockout --------------------------------------------------------------------------------------
    async def fail(self, key: str, username: str, resource: str, info: ReqInfo | None, reason: str,
                   action: str = "auth.login") -> None:
        """Count one failed authentication toward the lockout and audit it (and the lock it may start)."""
        locked = await self.lockout.failure(key)
        await self.audit(username[:64], action, resource, "failure", info, {"reason": reason})
        if locked > 0:
            await self.audit("system", "auth.lockout", resource, "success", info,
                             {"lock_s": round(locked, 1), "threshold": self.settings.lockout_threshold})

    async def refuse_if_locked(self, key: str, actor: str, action: str, resource: str,
                               info: ReqInfo | None) -> None:
        """A locked identity may not keep guessing, through login or the self-service routes."""
        locked = await self.lockout.locked_for(key)
        if locked > 0:
            await self.audit(actor[:64], action, resource, "denied", info, {"reason": "locked"})
            raise AccountLocked("too many failed attempts; the account is locked", retry_after=locked)

    # -- second factor --------------------------------------------------------------------------------
    async def totp_secret(self, user: UserRow) -> str:
        assert user.totp_secret is not None
        buf = await self.box.open(base64.b64decode(user.totp_secret), b"totp:" + user.id.encode())
        try:
            return buf.decode()  # pyotp needs a str: cannot be wiped (documented)
        finally:
            zero(buf)

    async def seal_totp_secret(self, user: UserRow, secret: str) -> str:
        """The secret sealed to this user (SM4-GCM, user id as associated data), base64 for the row."""
        sealed = await self.box.seal(secret.encode(), b"totp:" + user.id.encode())
        return base64.b64encode(sealed).decode()

    async def check_totp(self, user: UserRow, code: str, now: float) -> int | None:
        """The accepted time step, or None; a step is accepted once (two logins racing with one code: one wins)."""
        step = totp.verify(await self.totp_secret(user), code, now, user.totp_last_step)
        if step is None:
            return None
        return step if await self.repo.advance_totp_step(user.id, step) else None

    async def use_recovery(self, user: UserRow, code: str) -> bool:
        """Spend one recovery code (each works once, also under concurrent use)."""
        stored = user.recovery or ()
        h = totp.hash_recovery_code(code, user.id)
        match = [x for x in stored if hmac.compare_digest(x, h)]
        if not match or user.recovery is None:
            return False
        return await self.repo.replace_recovery(user.id, user.recovery, [x for x in stored if x != match[0]])
