"""What other code uses to reach keys: `CryptoClient` (published as `ctx.get("crypto")`).

```python
crypto = ctx.get("crypto")
sig = await crypto.sign("audit-signing", data)           # DER SM2 signature (fmt="raw" for r||s)
ok = await crypto.verify("audit-signing", data, sig)     # tries every active version
ct = await crypto.encrypt("secrets", b"...", aad=b"ctx")  # sm4 key: nonce||ct||tag; sm2 key: DER C1C3C2
pt = await crypto.decrypt("secrets", ct, aad=b"ctx")
mac = await crypto.hmac("api-key-mac", data); digest = await crypto.hash(data); rnd = await crypto.random(32)
```

Two implementations, same behaviour:
- `OwnerClient` (access = "owner"): one pipelined IPC connection per event loop to the HSM owner.
  Owner down or restarting: connection attempts are retried for a short window, then the call fails
  with `CryptoUnavailable` (503, Retry-After); in-flight calls on a broken connection fail at once;
  a stuck owner gives `CryptoTimeout` after `call_timeout_s`. Never a hang.
- `DirectClient` (access = "direct", soft backend only): the service in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from xcstack.crypto.errors import BackendError, CryptoTimeout, CryptoUnavailable, rebuild_error
from xcstack.crypto.service import CryptoService, Meta
from xcstack.crypto.settings import CryptoSettings
from xcstack.ipc.channel import IPCClient, IPCRemoteError, IPCTimeout, IPCUnavailable

ADMIN_OPS = frozenset({"create_key", "rotate_key"})  # not retried: not idempotent


class CryptoClient(ABC):
    """The async crypto API other capabilities use."""

    @abstractmethod
    async def call(self, op: str, meta: Meta | None = None, payload: bytes | memoryview = b"") -> tuple[Meta, bytes]:
        """Run one op (see `xcstack.crypto.service`) and return (meta, payload)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    async def sign(
        self,
        key: str,
        data: bytes | memoryview,
        *,
        uid: bytes | None = None,
        fmt: str = "der",
        version: int | None = None,
    ) -> bytes:
        meta: Meta = {"key": key, "fmt": fmt}
        if uid is not None:
            meta["uid"] = uid
        if version is not None:
            meta["version"] = version
        return (await self.call("sign", meta, data))[1]

    async def verify(
        self,
        key: str,
        data: bytes | memoryview,
        signature: bytes,
        *,
        uid: bytes | None = None,
        fmt: str = "der",
        version: int | None = None,
    ) -> bool:
        meta: Meta = {"key": key, "fmt": fmt, "sig": bytes(signature)}
        if uid is not None:
            meta["uid"] = uid
        if version is not None:
            meta["version"] = version
        return bool((await self.call("verify", meta, data))[0].get("valid"))

    async def encrypt(self, key: str, plaintext: bytes | memoryview, *, aad: bytes = b"", fmt: str = "der") -> bytes:
        meta: Meta = {"key": key, "fmt": fmt}
        if aad:
            meta["aad"] = aad
        return (await self.call("encrypt", meta, plaintext))[1]

    async def decrypt(
        self,
        key: str,
        ciphertext: bytes | memoryview,
        *,
        aad: bytes = b"",
        fmt: str = "der",
        version: int | None = None,
    ) -> bytes:
        meta: Meta = {"key": key, "fmt": fmt}
        if aad:
            meta["aad"] = aad
        if version is not None:
            meta["version"] = version
        return (await self.call("decrypt", meta, ciphertext))[1]

    async def hmac(self, key: str, data: bytes | memoryview) -> bytes:
        return (await self.call("hmac", {"key": key}, data))[1]

    async def hash(self, data: bytes | memoryview, alg: str = "sm3") -> bytes:
        return (await self.call("hash", {"alg": alg}, data))[1]

    async def random(self, n: int) -> bytes:
        return (await self.call("random", {"n": n}))[1]

    async def create_key(self, name: str, kind: str) -> dict[str, Any]:
        return dict((await self.call("create_key", {"key": name, "kind": kind}))[0]["record"])

    async def rotate_key(self, name: str) -> dict[str, Any]:
        return dict((await self.call("rotate_key", {"key": name}))[0]["record"])

    async def list_keys(self) -> list[dict[str, Any]]:
        return list((await self.call("list_keys"))[0]["keys"])

    async def public_key(self, name: str, version: int | None = None) -> dict[str, Any]:
        meta: Meta = {"key": name}
        if version is not None:
            meta["version"] = version
        return dict((await self.call("public_key", meta))[0]["record"])


class DirectClient(CryptoClient):
    """In-process service (soft backend, access = "direct")."""

    def __init__(self, factory: Any) -> None:
        """`factory`: async callable returning a started CryptoService (called once, lazily)."""
        self._factory = factory
        self._service: CryptoService | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._get()

    async def _get(self) -> CryptoService:
        if self._service is None:
            async with self._lock:
                if self._service is None:
                    self._service = await self._factory()
        assert self._service is not None
        return self._service

    async def call(self, op: str, meta: Meta | None = None, payload: bytes | memoryview = b"") -> tuple[Meta, bytes]:
        service = await self._get()
        m = dict(meta or {})
        m["op"] = op
        return await service.handle(m, memoryview(payload))

    async def close(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None


class OwnerClient(CryptoClient):
    """Client of the HSM owner process over the IPC channel."""

    def __init__(self, socket_path: str | Path, settings: CryptoSettings, reconnect_window_s: float = 0.5) -> None:
        self.socket_path = str(socket_path)
        self.timeout = settings.call_timeout_s
        self.reconnect_window_s = reconnect_window_s
        self._clients: dict[asyncio.AbstractEventLoop, IPCClient] = {}

    def _ipc(self) -> IPCClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = self._clients[loop] = IPCClient(self.socket_path, connect_timeout=min(1.0, self.timeout))
        return client

    async def call(self, op: str, meta: Meta | None = None, payload: bytes | memoryview = b"") -> tuple[Meta, bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        retry_until = loop.time() + min(self.reconnect_window_s, self.timeout)
        delay = 0.02
        while True:
            client = self._ipc()
            try:
                m, p = await client.call(op, meta, payload, timeout=max(0.001, deadline - loop.time()))
                return m, bytes(p)
            except IPCUnavailable as exc:
                if op in ADMIN_OPS or loop.time() + delay >= min(retry_until, deadline):
                    raise CryptoUnavailable(f"HSM owner unavailable ({exc}); retry shortly", retry_after=1) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
            except IPCTimeout:
                raise CryptoTimeout(
                    f"HSM owner did not answer {op} within {self.timeout:g}s; retry shortly", retry_after=1
                ) from None
            except IPCRemoteError as exc:
                if exc.code == "busy" or exc.retriable:
                    raise CryptoUnavailable(f"HSM owner busy: {exc.message}", retry_after=1) from None
                if exc.code == "internal":
                    raise BackendError("crypto backend failure (see the HSM owner's log)") from None
                raise rebuild_error(exc.code, exc.message) from None

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.close()
