"""What other code uses to reach keys: `CryptoClient` (`ctx.services.crypto` in a capability).

```python
crypto = ctx.services.crypto
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
from xcstack.crypto.service import BATCHABLE, CryptoService, Meta
from xcstack.crypto.settings import CryptoSettings
from xcstack.ipc.channel import IPCClient, IPCRemoteError, IPCTimeout, IPCUnavailable

ADMIN_OPS = frozenset({"create_key", "rotate_key"})  # not retried: not idempotent
BATCH_MAX_ITEMS = 64
BATCH_MAX_BYTES = 256 * 1024
BATCH_ITEM_MAX_BYTES = 16 * 1024
# frames a loop keeps in flight to the owner before it holds further calls back to send them together
# when one comes back (Nagle-like): fewer, fuller frames under load; a lone call still goes out at once
BATCH_WINDOW = 2


# (op, meta, payload, the caller's future, the caller's deadline on the loop clock)
_Item = tuple[str, Meta, bytes, "asyncio.Future[tuple[Meta, bytes]]", float]


class _Batcher:
    """Per event loop: calls made while another call is in flight are queued and sent together as
    one `batch` frame on the next loop iteration, or, while BATCH_WINDOW frames are in flight, when
    one of them comes back (Nagle-like: a lone call goes out at once)."""

    def __init__(self) -> None:
        self.pending: list[_Item] = []
        self.pending_bytes = 0
        self.inflight = 0
        self.scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()


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

    def __init__(
        self,
        socket_path: str | Path,
        settings: CryptoSettings,
        reconnect_window_s: float = 0.5,
        batching: bool = True,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = settings.call_timeout_s
        self.reconnect_window_s = reconnect_window_s
        self.batching = batching
        self._clients: dict[asyncio.AbstractEventLoop, IPCClient] = {}
        self._batchers: dict[asyncio.AbstractEventLoop, _Batcher] = {}
        self.ipc_calls = 0  # frames sent (for tests and metrics)

    def _ipc(self) -> IPCClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = self._clients[loop] = IPCClient(self.socket_path, connect_timeout=min(1.0, self.timeout))
        return client

    async def call(self, op: str, meta: Meta | None = None, payload: bytes | memoryview = b"") -> tuple[Meta, bytes]:
        if not self.batching or op not in BATCHABLE or len(payload) > BATCH_ITEM_MAX_BYTES:
            return await self._call(op, meta, payload)
        loop = asyncio.get_running_loop()
        b = self._batchers.get(loop)
        if b is None:
            for old in [lp for lp in self._batchers if lp.is_closed()]:
                del self._batchers[old]
            b = self._batchers[loop] = _Batcher()
        if b.inflight == 0 and not b.pending:
            b.inflight += 1
            try:
                return await self._call(op, meta, payload)
            finally:
                self._frame_done(b)
        fut: asyncio.Future[tuple[Meta, bytes]] = loop.create_future()
        b.pending.append((op, dict(meta or {}), bytes(payload), fut, loop.time() + self.timeout))
        b.pending_bytes += len(payload)
        if len(b.pending) >= BATCH_MAX_ITEMS or b.pending_bytes >= BATCH_MAX_BYTES:
            self._flush(b)
        elif not b.scheduled and b.inflight < BATCH_WINDOW:
            b.scheduled = True
            loop.call_soon(self._flush, b)
        # else: sent when an in-flight frame comes back (`_frame_done`); the deadline taken above
        # still bounds the whole wait (held back + in flight)
        return await fut

    def _frame_done(self, b: _Batcher) -> None:
        """A frame came back (or failed): send what was held back, after the callers just woken by
        its answers had their turn to add their next calls (they run first: scheduled earlier)."""
        b.inflight -= 1
        if b.pending and not b.scheduled and b.inflight < BATCH_WINDOW:
            b.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, b)

    def _flush(self, b: _Batcher) -> None:
        b.scheduled = False
        if not b.pending:
            return
        items, b.pending, b.pending_bytes = b.pending[:BATCH_MAX_ITEMS], b.pending[BATCH_MAX_ITEMS:], 0
        b.pending_bytes = sum(len(it[2]) for it in b.pending)
        now = asyncio.get_running_loop().time()
        live: list[_Item] = []
        for it in items:
            if it[3].done():  # the caller already gave up
                continue
            if it[4] <= now:  # held back until its time ran out (in-flight frames were stuck)
                it[3].set_exception(self._timeout_error(it[0]))
                continue
            live.append(it)
        items = live
        if not items:
            return
        b.inflight += 1
        task = asyncio.get_running_loop().create_task(self._send_batch(b, items))
        b.tasks.add(task)
        task.add_done_callback(b.tasks.discard)

    async def _send_batch(self, b: _Batcher, items: list[_Item]) -> None:
        try:
            timeout = max(0.001, min(it[4] for it in items) - asyncio.get_running_loop().time())
            if len(items) == 1:
                op, meta, payload, fut, _ = items[0]
                try:
                    res = await self._call(op, meta, payload, timeout)
                except Exception as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                else:
                    if not fut.done():
                        fut.set_result(res)
                return
            metas = [{**meta, "op": op} for op, meta, *_ in items]
            sizes = [len(it[2]) for it in items]
            try:
                m, p = await self._call(
                    "batch", {"items": metas, "sizes": sizes}, b"".join(it[2] for it in items), timeout
                )
            except Exception as exc:
                for it in items:
                    fut = it[3]
                    if not fut.done():
                        fut.set_exception(exc)
                return
            pos = 0
            for (_, _, _, fut, _), r, n in zip(items, m["results"], m["sizes"], strict=True):
                out, pos = p[pos : pos + n], pos + n
                if fut.done():
                    continue
                err = r.get("error") if isinstance(r, dict) else None
                if err is not None:
                    code, msg = str(err.get("code", "")), str(err.get("message", ""))
                    if err.get("retriable"):
                        fut.set_exception(CryptoUnavailable(msg, retry_after=1))
                    else:
                        fut.set_exception(rebuild_error(code, msg))
                else:
                    fut.set_result((r, out))
        finally:
            self._frame_done(b)

    def _timeout_error(self, op: str) -> CryptoTimeout:
        return CryptoTimeout(f"HSM owner did not answer {op} within {self.timeout:g}s; retry shortly", retry_after=1)

    async def _call(
        self, op: str, meta: Meta | None = None, payload: bytes | memoryview = b"", timeout: float | None = None
    ) -> tuple[Meta, bytes]:
        loop = asyncio.get_running_loop()
        self.ipc_calls += 1
        timeout = self.timeout if timeout is None else timeout
        deadline = loop.time() + timeout
        retry_until = loop.time() + min(self.reconnect_window_s, timeout)
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
                raise self._timeout_error(op) from None
            except IPCRemoteError as exc:
                if exc.code == "busy" or exc.retriable:
                    raise CryptoUnavailable(f"HSM owner busy: {exc.message}", retry_after=1) from None
                if exc.code == "internal":
                    raise BackendError("crypto backend failure (see the HSM owner's log)") from None
                raise rebuild_error(exc.code, exc.message) from None

    async def close(self) -> None:
        for b in self._batchers.values():
            for t in list(b.tasks):
                t.cancel()
        self._batchers.clear()
        clients, self._clients = self._clients, {}
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.close()
