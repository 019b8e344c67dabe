"""Pipelined request/response over a Unix-domain socket, on the framing of `framing.py`.

Many calls share one connection: each request carries an id, the server runs requests
concurrently and answers in completion order. A caller that gives up (timeout or cancellation)
sends CANCEL so the server stops the work. When the connection breaks every in-flight call fails at
once with `IPCUnavailable` (retriable), and the next call reconnects: a dead peer never hangs a caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from xcstack.aio import cancel_and_wait
from xcstack.ipc.framing import Frame, FramingError, MsgType, encode_frame, read_frame

log = logging.getLogger("xcstack.ipc")

Payload = bytes | bytearray | memoryview
Handler = Callable[[dict[str, Any], memoryview], Awaitable[tuple[dict[str, Any], Payload]]]


HIGH_WATER = 1 << 20  # bytes buffered in the transport before a writer waits for drain


class _Outbox:
    """Coalesces the frames written during one loop iteration into one write (one syscall)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._parts: list[Payload] = []
        self._scheduled = False

    def send(self, parts: list[Payload]) -> None:
        self._parts.extend(parts)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        parts, self._parts = self._parts, []
        if parts and not self.writer.is_closing():
            self.writer.writelines(parts)

    async def maybe_drain(self) -> None:
        transport = self.writer.transport
        if transport is not None and transport.get_write_buffer_size() > HIGH_WATER:
            self.flush()
            await self.writer.drain()


class IPCError(Exception):
    retriable = False


class IPCUnavailable(IPCError):
    """The peer is down or the connection broke; safe to retry (maybe elsewhere)."""

    retriable = True


class IPCTimeout(IPCError):
    """The peer did not answer in time; the request was cancelled on the peer."""

    retriable = True


class IPCRemoteError(IPCError):
    """The peer's handler failed with a code (raised by handlers, re-raised on the caller)."""

    def __init__(self, code: str, message: str, retriable: bool = False, **extra: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retriable = retriable
        self.extra = extra

    def meta(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retriable": self.retriable, **self.extra}


class IPCServer:
    """Serve `handler(meta, payload)` on a Unix socket; requests on a connection run concurrently."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler, max_inflight_per_conn: int = 1024) -> None:
        self.path = str(path)
        self.handler = handler
        self.max_inflight = max_inflight_per_conn
        self._server: asyncio.AbstractServer | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._on_connection, path=self.path)
        os.chmod(self.path, 0o600)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._conn_tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)  # type: ignore[arg-type]
        inflight: dict[int, asyncio.Task[None]] = {}
        outbox = _Outbox(writer)
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.CancelledError:  # the server is closing: end this connection quietly
                    return
                except FramingError as exc:
                    log.warning("ipc: dropping connection on %s: %s", self.path, exc)
                    return
                if frame.msg_type is MsgType.CANCEL:
                    running = inflight.get(frame.request_id)
                    if running is not None:
                        running.cancel()
                elif frame.msg_type is MsgType.REQUEST:
                    if len(inflight) >= self.max_inflight:
                        err = IPCRemoteError("busy", "too many requests in flight on this connection", True)
                        outbox.send(encode_frame(MsgType.ERROR, frame.request_id, err.meta()))
                        continue
                    rid = frame.request_id
                    t = asyncio.create_task(self._run(frame, outbox))
                    inflight[rid] = t
                    t.add_done_callback(_forget(inflight, rid))
        finally:
            for t in list(inflight.values()):
                t.cancel()
            writer.close()
            self._conn_tasks.discard(task)  # type: ignore[arg-type]

    async def _run(self, frame: Frame, outbox: _Outbox) -> None:
        try:
            meta, payload = await self.handler(frame.meta, frame.payload)
            parts = encode_frame(MsgType.RESPONSE, frame.request_id, meta, payload)
        except asyncio.CancelledError:
            return  # the caller left; it expects no answer
        except IPCRemoteError as exc:
            parts = encode_frame(MsgType.ERROR, frame.request_id, exc.meta())
        except Exception as exc:
            log.exception("ipc handler failed for op %r", frame.meta.get("op"))
            parts = encode_frame(MsgType.ERROR, frame.request_id, IPCRemoteError("internal", repr(exc)).meta())
        if outbox.writer.is_closing():
            return
        outbox.send(parts)
        with contextlib.suppress(ConnectionError):
            await outbox.maybe_drain()


def socket_accepts(path: str | os.PathLike[str]) -> bool:
    """True when something accepts connections on the Unix socket (a stale file does not count)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _forget(inflight: dict[int, asyncio.Task[None]], rid: int) -> Callable[[asyncio.Task[None]], None]:
    def done(_task: asyncio.Task[None]) -> None:
        inflight.pop(rid, None)

    return done


class IPCClient:
    """A pipelined client; safe to share between coroutines of one event loop."""

    def __init__(self, path: str | os.PathLike[str], connect_timeout: float = 1.0) -> None:
        self.path = str(path)
        self.connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: _Outbox | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @property
    def inflight(self) -> int:
        return len(self._pending)

    async def _ensure_connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        async with self._connect_lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            if self._closed:
                raise IPCUnavailable(f"client for {self.path} is closed")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.path, limit=1 << 20), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                raise IPCUnavailable(f"cannot reach {self.path}: {exc}") from None
            self._writer = writer
            self._outbox = _Outbox(writer)
            self._reader_task = asyncio.create_task(self._read_loop(reader, writer))
            return writer

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                frame = await read_frame(reader)
                fut = self._pending.pop(frame.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except (asyncio.IncompleteReadError, ConnectionError, FramingError) as exc:
            reason = f"connection to {self.path} lost: {exc.__class__.__name__}"
        except asyncio.CancelledError:
            reason = "client closed"
        finally:
            if self._writer is writer:
                self._writer = None
                self._outbox = None
            writer.close()
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(IPCUnavailable(reason))

    async def call(
        self, op: str, meta: dict[str, Any] | None = None, payload: Payload = b"", timeout: float = 5.0
    ) -> tuple[dict[str, Any], memoryview]:
        """Send one request and wait for its answer (at most `timeout` seconds in all)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._ensure_connected()
        outbox = self._outbox
        assert outbox is not None
        request_id = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[Frame] = loop.create_future()
        self._pending[request_id] = fut
        try:
            outbox.send(encode_frame(MsgType.REQUEST, request_id, {**(meta or {}), "op": op}, payload))
            try:
                async with asyncio.timeout_at(deadline):
                    await outbox.maybe_drain()
                    frame = await fut
            except TimeoutError:
                self._cancel_remote(request_id)
                raise IPCTimeout(f"{op}: no answer from {self.path} within {timeout:.3g}s") from None
            except asyncio.CancelledError:
                self._cancel_remote(request_id)
                raise
            except ConnectionError as exc:
                raise IPCUnavailable(f"connection to {self.path} lost: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a failure set by the read loop is not "never retrieved"
        if frame.msg_type is MsgType.ERROR:
            m = dict(frame.meta)
            raise IPCRemoteError(
                str(m.pop("code", "internal")), str(m.pop("message", "")), bool(m.pop("retriable", False)), **m
            )
        return frame.meta, frame.payload

    def _cancel_remote(self, request_id: int) -> None:
        outbox = self._outbox
        if outbox is not None and not outbox.writer.is_closing():
            with contextlib.suppress(Exception):
                outbox.send(encode_frame(MsgType.CANCEL, request_id))

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait([self._reader_task])
        if self._writer is not None:
            self._writer.close()
            self._writer = None
