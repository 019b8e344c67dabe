"""Entry point of the processes the supervisor starts (`python -m xcstack.worker ...`).

- http worker: serves the ASGI app on the listening socket inherited from the supervisor
  (`--fd`), with uvicorn (uvloop + httptools) or Granian; tells the supervisor it is ready by
  writing one byte to `--ready-fd` once every capability has started.
- side process: imports `--side module:function` and calls `function(settings, index)`.
Both pin themselves to the cores in `XC_WORKER_CPUS` before doing anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from xcstack.config import Settings, load_settings
from xcstack.observability.logs import setup_logging

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


def run_uvicorn(settings: Settings, sock: socket.socket, app: Any) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        loop=resolve_loop(settings),
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.server.graceful_timeout_s),
        timeout_keep_alive=5,
        backlog=settings.server.backlog,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


def run_granian(settings: Settings, sock: socket.socket, app: Any) -> None:
    """Granian's embedded server on our inherited socket (one Rust runtime thread, asyncio loop)."""
    import asyncio

    from granian._granian import SocketHolder
    from granian.constants import Interfaces
    from granian.server.embed import Server

    class InheritedSocketServer(Server):  # type: ignore[misc]
        def _init_shared_socket(self) -> None:
            self._ssp = None  # type: ignore[assignment]
            self._shd = SocketHolder(sock.fileno(), False, settings.server.backlog)  # type: ignore[assignment,call-arg]
            self._sfd = sock.fileno()  # type: ignore[assignment]

    host, port = sock.getsockname()[:2]  # for granian's own log lines; the socket is inherited
    server = InheritedSocketServer(
        app, address=host, port=port, interface=Interfaces.ASGI, log_access=False, backlog=settings.server.backlog
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

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
