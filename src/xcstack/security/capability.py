"""The security capability: wires the audit log, the security service, the middleware and routes.

What `app.py` uses: `create(ctx)` returns a `SecurityCapability` (None when `[security] enabled =
false`) with `routes()`, `middleware() -> list[Middleware]` (one `SecurityMiddleware`), `start()`,
`stop()`, `ready()` and `route_authorizer()`. It sets `ctx.services.secrets`: named secrets at rest,
`await secrets.resolve("secret:NAME")` for upstream API keys and DB passwords referenced from config
(see `security/secrets.py`), usable after this capability started (its migrations create the table).

Signing (audit checkpoints, trusted-boot manifest) goes through the crypto capability's client
(`ctx.services.crypto`, key `[security] signing_key`) when it is there; without it an in-process
SM2 key kept under `<data_dir>/security/` (0600) is used and a warning is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from xcstack.aio import cancel_and_wait
from xcstack.capability import AppContext, Wiring
from xcstack.errors import XCError
from xcstack.security.audit.export import Exporter, HttpSink, Sink, SyslogTcpSink
from xcstack.security.audit.log import AuditLog
from xcstack.security.authz import SecurityAuthorizer
from xcstack.security.keys import ensure_key, local_signer
from xcstack.security.lockout import Lockout, RedisLockout, StateLockout
from xcstack.security.middleware import SecurityMiddleware
from xcstack.security.routes import build_routes
from xcstack.security.secretbox import LocalSecretBox, SecretBox, ServiceSecretBox
from xcstack.security.secrets import SecretStore
from xcstack.security.service import SecurityService
from xcstack.security.signing import ServiceSigner, Signer

log = logging.getLogger("xcstack.security")

SECRETBOX_KEY = "security-secrets"
WIRING = Wiring(provides=("secrets", "groups"), uses=("crypto",))


def local_secretbox(ctx_settings: Any) -> LocalSecretBox:
    """SM4 key derived from the crypto master key (HMAC-SM3), for when the crypto owner is absent."""
    from xcstack.crypto.keystore import load_master_key
    from xcstack.crypto.recipes import hmac_sm3

    master = load_master_key(ctx_settings.crypto, ctx_settings.data_dir)
    return LocalSecretBox(hmac_sm3(master, b"xcstack-security-secretbox-v1")[:16])


class SecurityCapability:
    name = "security"

    def __init__(
        self,
        ctx: AppContext,
        *,
        signer: Signer | None = None,
        secretbox: SecretBox | None = None,
        lockout: Lockout | None = None,
        clock: Callable[[], float] = time.time,
        print_bootstrap: Callable[[str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.security
        self.data_dir = Path(ctx.settings.data_dir)
        self.audit_root = Path(self.settings.audit.dir or self.data_dir / "audit")
        self.clock = clock
        self._signer = signer
        self._print = print_bootstrap or (lambda s: print(s, file=sys.stderr, flush=True))
        crypto = ctx.services.crypto
        if secretbox is None:
            secretbox = ServiceSecretBox(crypto, SECRETBOX_KEY) if crypto is not None else None
        self.box: SecretBox | None = secretbox
        self.audit = AuditLog(self.audit_root, self.settings.audit, signer=None, clock=clock)
        s = self.settings
        if lockout is None:
            if s.redis_url is not None:
                lockout = RedisLockout(s.redis_url.get_secret_value(), s.redis_prefix, s.lockout_threshold,
                                       s.lockout_s)
            else:
                lockout = StateLockout(ctx.state, s.lockout_threshold, s.lockout_s, clock)
        self.service = SecurityService(s, ctx.state, _LazyBox(self), lockout, self.audit, clock)
        self._authz = SecurityAuthorizer(self.service, frozenset({f"key:{s.signing_key}", f"key:{SECRETBOX_KEY}"}))
        self._tasks: list[asyncio.Task[Any]] = []
        self._exporters: list[Exporter] = []
        self.trust_monitor: Any = None
        self._key_verifier: Any = None
        self.secrets = SecretStore(ctx.state, _LazyBox(self), clock)
        ctx.services.secrets = self.secrets
        ctx.services.groups = self.service.groups

    # -- Capability protocol ---------------------------------------------------------------------
    def routes(self) -> Sequence[BaseRoute]:
        return build_routes(self.service, self.audit_root, self.sig_verify, self.secrets)

    def middleware(self) -> list[Middleware]:
        return [Middleware(SecurityMiddleware, service=self.service, settings=self.settings, authorizer=self._authz)]

    @property
    def signer(self) -> Signer | None:
        return self._signer

    async def start(self) -> None:
        if self._signer is None:
            crypto = self.ctx.services.crypto
            if crypto is not None:
                try:
                    await ensure_key(crypto, self.settings.signing_key, "sm2")
                    if isinstance(self.box, ServiceSecretBox):
                        await ensure_key(crypto, SECRETBOX_KEY, "sm4")
                except XCError as exc:  # owner not up yet: keys are created by whoever comes first
                    log.warning("could not ensure security keys in the keystore yet: %s", exc.message)
                self._signer = ServiceSigner(crypto, self.settings.signing_key)
            else:
                log.warning("no crypto capability: audit checkpoints are signed with a local SM2 key file")
                self._signer = await asyncio.to_thread(local_signer, self.data_dir, self.settings.signing_key)
        if self.box is None:
            self.box = await asyncio.to_thread(local_secretbox, self.ctx.settings)
        self.audit.signer = self._signer
        self.audit.sig_verify = self.sig_verify
        # verifies the chain first: a damaged or unsigned-tail chain raises AuditIntegrityError (the worker
        # does not start) or, with on_integrity_failure = "read_only", is left alone for a fresh chain
        await self.audit.open()
        await self.service.init()
        created = await self.service.bootstrap()
        if created:
            lines = ["", "=" * 72, "xcstack: first start — administrator accounts created (三权分立).",
                     "One-time passwords, shown once; each must be changed at first login:"]
            lines += [f"  {name:<10} role {role:<9} password {pw}" for name, role, pw in created]
            lines += ["=" * 72, ""]
            self._print("\n".join(lines))
        a = self.settings.audit
        sinks: list[Sink] = []
        if a.export_syslog:
            sinks.append(SyslogTcpSink(a.export_syslog, a.export_timeout_s))
        if a.export_http:
            sinks.append(HttpSink(a.export_http, a.export_timeout_s))
        loop = asyncio.get_running_loop()
        for sink in sinks:
            exp = Exporter(self.audit.dir, sink, a.export_batch)
            self._exporters.append(exp)
            self._tasks.append(loop.create_task(exp.run_forever(a.export_interval_s)))
        self._tasks.append(loop.create_task(self._retention_loop()))
        from xcstack.security.trust import TrustMonitor

        self.trust_monitor = TrustMonitor(self.ctx.settings, self.audit, self._signer)
        if self.trust_monitor.enabled:
            self._tasks.append(loop.create_task(self.trust_monitor.run()))

    async def _retention_loop(self) -> None:
        """Hourly: seal and compress closed segments the writer did not close itself (an earlier
        process's), then prune what is past retention (never before the exporters shipped it)."""
        while True:
            try:
                await self.audit.archive()
                floor = min((e.cursor for e in self._exporters), default=None)
                await self.audit.purge_expired(floor)
            except Exception as exc:
                log.error("audit retention pass failed: %s", exc)
            await asyncio.sleep(3600)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for e in self._exporters:
            with contextlib.suppress(Exception):
                await e.run_once()  # flush what is left, bounded by the sink timeout
            await e.sink.close()
        await self.audit.close()
        await self.service.lockout.close()

    async def ready(self) -> tuple[bool, str]:
        if self.audit._thread is None or not self.audit._thread.is_alive():
            return False, "audit log writer is not running"
        detail = f"audit chain {self.audit.chain} at seq {self.audit.durable_seq}"
        if self.audit.integrity_failures:  # started read-only over failed chains: say so on every probe
            detail += "; AUDIT INTEGRITY FAILURE (left read-only): " + "; ".join(
                str(p) for p in self.audit.integrity_failures)
        return True, detail

    # -- guard seam ------------------------------------------------------------------------------
    def route_authorizer(self) -> SecurityAuthorizer:
        """The app's authorizer: `app.py` wraps every route with its check, the middleware installs it."""
        return self._authz

    async def sig_verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        """Checkpoints of this signer's key go through it (every keystore version); others (a local
        key used before the crypto capability was enabled, a retired key id) by public key."""
        if self._signer is not None and key_id == self._signer.key_id:
            return await self._signer.verify(message, signature)
        from xcstack.security.keys import KeyVerifier

        if self._key_verifier is None:
            self._key_verifier = KeyVerifier(self.ctx.settings)
        return await self._key_verifier(key_id, message, signature)


class _LazyBox:
    """The secret box resolved at start (the local one is derived off the loop, in `start`)."""

    def __init__(self, cap: SecurityCapability) -> None:
        self.cap = cap

    async def seal(self, plaintext: bytes | bytearray, aad: bytes) -> bytes:
        assert self.cap.box is not None, "security capability not started"
        return await self.cap.box.seal(plaintext, aad)

    async def open(self, sealed: bytes, aad: bytes) -> bytearray:
        assert self.cap.box is not None, "security capability not started"
        return await self.cap.box.open(sealed, aad)


def create(ctx: AppContext) -> SecurityCapability | None:
    if not ctx.settings.security.enabled:
        log.warning("[security] enabled = false: no authentication, no RBAC, no audit log")
        return None
    return SecurityCapability(ctx)
