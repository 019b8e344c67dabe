"""The HSM owner: the only process that opens the crypto device.

The supervisor starts it (`side_processes` in `xcstack.crypto.capability`) as
`xcstack.crypto.owner:run_owner(settings, index)`. It opens the keystore and the backend once,
then serves `CryptoService.handle` on a Unix socket (mode 0600, directory 0700) through the IPC
channel: requests from every http worker are pipelined on their connections and run concurrently
on one event loop. Backend calls are short and run inline (PKCS#11/SDF sessions are not shared
between threads; large inputs go to a worker thread inside the service).

Errors cross as IPC error frames carrying the stable code; anything unexpected is logged here and
reaches the caller as `crypto_backend_error` without internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from xcstack.crypto.backends import open_backend
from xcstack.crypto.keystore import Keystore
from xcstack.crypto.protocol import CryptoCode
from xcstack.crypto.service import CryptoService
from xcstack.errors import Overloaded, XCError
from xcstack.ipc.channel import IPCRemoteError, IPCServer
from xcstack.state.store import StateStore

if TYPE_CHECKING:
    from xcstack.config import Settings

log = logging.getLogger("xcstack.crypto.owner")

NATIVE_TRACE_DROPPED = Counter(
    "xc_crypto_native_trace_lines_dropped_total", "GmSSL call-trace lines removed from the HSM owner's stderr"
)
# GmSSL (inside gmssl-pyx) prints its call trace on every failed SM2 verify/decrypt, e.g.
# "/project/GmSSL/src/sm2_sign.c:328:sm2_do_verify():" - noise that bad input could flood logs with.
_GMSSL_TRACE = re.compile(rb"^\S*GmSSL/src/[\w./-]+\.c:\d+:\w+\(\):\s*$")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def filter_native_stderr() -> bool:
    """Route fd 2 through a thread that drops GmSSL trace lines and passes everything else on.
    If the thread ever fails, fd 2 is restored, so no writer can block on a dead pipe."""
    try:
        r, w = os.pipe()
        saved = os.dup(2)
    except OSError:
        return False
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                keep = [ln for ln in lines if not _GMSSL_TRACE.match(ln)]
                if len(keep) != len(lines):
                    NATIVE_TRACE_DROPPED.inc(len(lines) - len(keep))
                if keep:
                    _write_all(saved, b"\n".join(keep) + b"\n")
                if len(buf) > 65536:  # a very long unterminated line: pass it on as is
                    _write_all(saved, buf)
                    buf = b""
        except Exception:
            pass
        finally:
            os.dup2(saved, 2)
            os.close(r)

    threading.Thread(target=pump, name="xc-stderr-filter", daemon=True).start()
    return True


def socket_path(settings: Settings) -> Path:
    return settings.crypto.socket_path or (settings.data_dir / "run" / "hsm-owner.sock")


async def build_service(settings: Settings, store: StateStore | None = None) -> CryptoService:
    """Keystore + backend + service, ready to serve (used by the owner, direct mode and the CLI)."""
    if store is None:
        store = StateStore(
            settings.state.url.get_secret_value() if settings.state.url else None,
            settings.data_dir,
            pool_size=2,
        )
    keystore = Keystore(store, settings.crypto)
    await keystore.init()
    backend = await asyncio.to_thread(open_backend, settings.crypto, settings.data_dir)
    mk = getattr(backend, "master_key", None)
    if isinstance(mk, bytes):
        await keystore.check_master_key(mk)
    return CryptoService(keystore, backend, settings.crypto)


def make_handler(service: CryptoService) -> Any:
    async def handler(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], bytes]:
        try:
            return await service.handle(meta, payload)
        except XCError as exc:
            raise IPCRemoteError(exc.code, exc.message, isinstance(exc, Overloaded)) from None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("crypto op %r failed in the backend", meta.get("op"))
            raise IPCRemoteError(CryptoCode.CRYPTO_BACKEND_ERROR,
                                 "crypto backend failure (see the HSM owner's log)") from None

    return handler


async def serve_owner(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the owner until `stop` is set (or forever)."""
    path = socket_path(settings)
    if len(os.fsencode(path)) > 104:  # sun_path is 108 bytes on Linux (104 on some BSDs)
        raise RuntimeError(
            f"HSM owner socket path {path} is too long for a Unix socket; set [crypto] socket_path to a shorter path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path.parent, 0o700)
    service = await build_service(settings)
    server = IPCServer(path, make_handler(service))
    await server.start()
    log.info("hsm owner serving on %s (backend %s, pid %d)", path, service.backend.name, os.getpid())
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await server.close()
        service.close()
        await service.keystore.store.close()


def run_owner(settings: Settings, index: int = 0) -> None:
    """Side-process entry point (`xcstack.crypto.owner:run_owner`)."""
    logging.basicConfig(level=getattr(logging, settings.observability.log_level, logging.INFO))
    filter_native_stderr()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve_owner(settings, stop)

    if _want_uvloop(settings):
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _want_uvloop(settings: Settings) -> bool:
    """The owner runs the same loop as the http workers (uvloop unless `[server] loop = "asyncio"`)."""
    if settings.server.loop == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:  # `python -m xcstack.crypto.owner` (tests, manual runs)
    from xcstack.config import load_settings

    run_owner(load_settings())


if __name__ == "__main__":
    main()
