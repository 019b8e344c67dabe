"""Entry point of the processes the supervisor starts (`python -m xcstack.worker ...`).

- http worker: serves the ASGI app on the listening socket inherited from the supervisor
  (`--fd`), with uvicorn (uvloop + httptools) or Granian; tells the supervisor it is ready by
  writing one byte to `--ready-fd` once every capability has started.
- side process: imports `--side module:function` and calls `function(settings, index)`.
Both pin themselves to the cores in `XC_WORKER_CPUS` before doing anything else.

Request-phase limits are the same under both servers (`[server]` settings; docs/security.md, "Request
timeouts"): a new connection must send its first byte within `idle_timeout_s`; a request head must be
complete `header_timeout_s` after its first byte, or on a kept-alive connection after the previous
response (hyper's rule, which Granian follows; uvicorn is made to match); the body is bounded by the
observability middleware. The servers' own size limits sit above the app's (`max_url_bytes`,
`max_header_bytes`), so clients get the app's JSON 414/431; only heads beyond the servers' buffers and
malformed HTTP are answered by the server itself (uvicorn: JSON as well; Granian: an empty 400/431).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import importlib.util
import logging
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from xcstack.config import Settings, load_settings
from xcstack.errors import CoreCode
from xcstack.httputil import dumps
from xcstack.observability.logs import setup_logging
from xcstack.observability.metrics import HTTP_EARLY_CLOSES

log = logging.getLogger("xcstack.worker")


def pin_from_env() -> list[int] | None:
    raw = os.environ.get("XC_WORKER_CPUS", "")
    if not raw:
        return None
    cpus = [int(c) for c in raw.split(",") if c.strip()]
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, AttributeError) as exc:
        log.warning("cannot pin to cpus %s: %s", cpus, exc)
        return None
    return cpus


def resolve_loop(settings: Settings) -> str:
    if settings.server.loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if settings.server.loop == "uvloop":
            log.warning("uvloop requested but not installed; using asyncio")
        return "asyncio"
    return "uvloop"


def _notify_ready(ready_fd: int | None) -> Callable[[], None]:
    def notify() -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"R")
                os.close(ready_fd)

    return notify


def build_worker_app(settings: Settings, on_ready: Callable[[], None]) -> Any:
    from xcstack.app import create_app

    app = create_app(settings)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            # Everything loaded at start lives as long as the process: move it out of the GC's
            # reach, so a full collection takes <1 ms instead of 20-30 ms of loop stall.
            gc.collect()
            gc.freeze()
            on_ready()
            yield state

    app.router.lifespan_context = lifespan
    return app


def server_head_limit(settings: Settings) -> int:
    """The servers' own bound on a request head: well above the app's `max_header_bytes`, so that the app
    (JSON 431) answers for heads between the two."""
    return 2 * settings.server.max_header_bytes + 16 * 1024


def _error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    payload = dumps({"error": {"type": "invalid_request_error", "code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + payload


def uvicorn_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the limits uvicorn lacks: a first-byte (idle) timeout; a head
    timeout that runs from the first byte or from the previous response (uvicorn's keep-alive timer
    stops at any byte, so a client trickling a head was never cut); a bound on the head's size
    (httptools has none); JSON instead of plain text for malformed requests."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    idle_s = settings.server.idle_timeout_s
    head_s = settings.server.header_timeout_s
    head_limit = server_head_limit(settings)

    class XCHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None
        _fresh = True  # no byte received yet
        _in_head = True
        _head_bytes = 0
        _rejected = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(idle_s, "idle_timeout")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, delay: float, reason: str) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(delay, self._expire, reason)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self, reason: str) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                HTTP_EARLY_CLOSES.labels(reason).inc()
                self.transport.close()  # as Granian does: no answer to a client that sends no request

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return
            if self._fresh:
                self._fresh = False
                self._arm(head_s, "header_timeout")  # the first byte: the head's clock starts
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > head_limit:
                    self._reject(431, "Request Header Fields Too Large", CoreCode.HEADERS_TOO_LARGE,
                                 f"the request head exceeds {head_limit} bytes")

        def _reject(self, status: int, reason: str, code: str, message: str) -> None:
            self._rejected = True
            self._disarm()
            HTTP_EARLY_CLOSES.labels(code).inc()
            self.transport.write(_error_bytes(status, reason, code, message))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._reject(400, "Bad Request", CoreCode.MALFORMED_REQUEST, "the request is not valid HTTP/1.1")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            if self._head_timer is None:  # a pipelined head: its own clock
                self._arm(head_s, "header_timeout")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:
                # idle keep-alive: the next head must be complete within header_timeout_s (hyper's rule)
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
                self._arm(head_s, "header_timeout")

    return XCHttpToolsProtocol


def run_uvicorn(settings: Settings, sock: socket.socket, app: Any) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        loop=resolve_loop(settings),
        http=uvicorn_protocol(settings),
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.server.graceful_timeout_s),
        timeout_keep_alive=max(1, round(settings.server.header_timeout_s)),  # superseded by the protocol's timer
        backlog=settings.server.backlog,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


_TCP_INFO_LEN = 136  # struct tcp_info through tcpi_bytes_received (Linux >= 4.1)


def close_silent_connections(listen_fd: int, port: int, idle_s: float) -> int:
    """Shut down the accepted connections on `port` that have not sent one byte in `idle_s` seconds.

    Granian (hyper) starts its header timer only at a connection's first byte, so a client that connects
    and sends nothing holds a connection (and a file descriptor) forever. Granian accepts in Rust, out of
    Python's sight: this reads the process's TCP sockets' TCP_INFO (bytes received, time since the last
    data) and shuts the silent ones down; Granian then sees EOF and drops them. Every check is made on a
    duplicate of the descriptor, so a number reused meanwhile is judged by its new socket."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == listen_fd:
            continue
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with dup:
            try:
                if dup.type != socket.SOCK_STREAM or dup.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if dup.getsockname()[1] != port:
                    continue
                info = dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
                if len(info) < _TCP_INFO_LEN or info[0] != 1:  # 1: TCP_ESTABLISHED
                    continue
                (last_data_recv_ms,) = struct.unpack_from("I", info, 52)
                (bytes_received,) = struct.unpack_from("Q", info, 128)
                if bytes_received == 0 and last_data_recv_ms >= idle_s * 1000:
                    dup.shutdown(socket.SHUT_RDWR)
                    closed += 1
            except OSError:
                continue
    if closed:
        HTTP_EARLY_CLOSES.labels("idle_timeout").inc(closed)
    return closed


def _silent_connection_sweeper(sock: socket.socket, idle_s: float) -> threading.Event:
    """A daemon thread running `close_silent_connections` a few times per `idle_s`; set the event to stop it."""
    stop = threading.Event()
    listen_fd, port = sock.fileno(), sock.getsockname()[1]
    interval = min(5.0, max(0.25, idle_s / 4))

    def run() -> None:
        while not stop.wait(interval):
            try:
                close_silent_connections(listen_fd, port, idle_s)
            except Exception:  # a sweep must never take the worker down
                log.exception("silent-connection sweep failed")

    threading.Thread(target=run, name="xc-idle-sweeper", daemon=True).start()
    return stop


# Optional packages Granian imports at its own import for features an http worker never uses (watchfiles:
# --reload; setproctitle: its process manager names processes): ~0.7 MB of RSS and a Rust library.
GRANIAN_UNUSED_IMPORTS = ("watchfiles", "setproctitle")


@contextlib.contextmanager
def hidden_modules(names: Sequence[str]) -> Iterator[None]:
    """`import NAME` raises ImportError inside the block for each name not already imported (a None entry
    in sys.modules); afterwards the names are importable again."""
    hide = [n for n in names if n not in sys.modules]
    for name in hide:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hide:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def inherited_socket_server(sock: socket.socket, backlog: int) -> type[Any]:
    """Granian's embedded `Server`, serving on `sock` (inherited from the supervisor) instead of binding.

    Granian has no public interface for an already-listening socket, so this overrides its private
    `_init_shared_socket` and wraps our fd in `granian._granian.SocketHolder`. That is why pyproject.toml
    pins granian to the versions verified; tests/core/test_granian_seam.py fails on one that breaks it."""
    with hidden_modules(GRANIAN_UNUSED_IMPORTS):
        from granian._granian import SocketHolder
        from granian.server.embed import Server

    class InheritedSocketServer(Server):  # type: ignore[misc]
        def _init_shared_socket(self) -> None:
            self._ssp = None  # type: ignore[assignment]
            self._shd = SocketHolder(sock.fileno(), False, backlog)  # type: ignore[assignment,call-arg]
            self._sfd = sock.fileno()  # type: ignore[assignment]

    return InheritedSocketServer


def run_granian(settings: Settings, sock: socket.socket, app: Any) -> None:
    """Granian's embedded server on our inherited socket (one Rust runtime thread, asyncio loop), HTTP/1.1
    only, as uvicorn (the head timeout and size limits are HTTP/1 settings)."""
    with hidden_modules(GRANIAN_UNUSED_IMPORTS):  # the first import of granian: see GRANIAN_UNUSED_IMPORTS
        from granian.constants import HTTPModes, Interfaces
        from granian.http import HTTP1Settings

    host, port = sock.getsockname()[:2]  # for granian's own log lines; the socket is inherited
    http1 = HTTP1Settings(
        header_read_timeout=max(1, round(settings.server.header_timeout_s * 1000)),
        max_buffer_size=max(8192 + 4096 * 100, server_head_limit(settings)),
    )
    server = inherited_socket_server(sock, settings.server.backlog)(
        app, address=host, port=port, interface=Interfaces.ASGI, log_access=False, backlog=settings.server.backlog,
        http=HTTPModes.http1, http1_settings=http1,
    )
    stop_sweeper = _silent_connection_sweeper(sock, settings.server.idle_timeout_s)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        try:
            await server.serve()
        finally:
            stop_sweeper.set()

    if resolve_loop(settings) == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def run_http_worker(fd: int, ready_fd: int | None) -> None:
    settings = load_settings()
    setup_logging(settings.observability.log_level, settings.observability.log_json)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the supervisor's business
    cpus = pin_from_env()
    sock = socket.socket(fileno=fd)
    app = build_worker_app(settings, _notify_ready(ready_fd))
    log.info("http worker up", extra={"server": settings.server.http_server, "cpus": cpus})
    if settings.server.http_server == "granian" and importlib.util.find_spec("granian") is not None:
        run_granian(settings, sock, app)
    elif settings.server.http_server == "granian":  # e.g. LoongArch: no granian wheel
        log.warning("granian is not installed on this platform; serving with uvicorn")
        run_uvicorn(settings, sock, app)
    else:
        run_uvicorn(settings, sock, app)


def run_side_process(target: str, index: int) -> None:
    settings = load_settings()
    setup_logging(settings.observability.log_level, settings.observability.log_json)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pin_from_env()
    module_name, _, func_name = target.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(settings, index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xcstack.worker")
    parser.add_argument("--fd", type=int)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--side")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    if args.side:
        run_side_process(args.side, args.index)
    elif args.fd is not None:
        run_http_worker(args.fd, args.ready_fd)
    else:
        parser.error("--fd or --side is required")
    return 0


if __name__ == "__main__":
    sys.exit(main())
