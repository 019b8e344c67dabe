"""End to end with the real supervisor: the HSM owner it starts is killed and comes back by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from xcstack.config import load_settings
from xcstack.crypto.client import OwnerClient
from xcstack.crypto.errors import CryptoTimeout, CryptoUnavailable
from xcstack.crypto.owner import socket_path

from .conftest import owner_env

SERVE = (
    "import sys\n"
    "from xcstack.config import load_settings\n"
    "from xcstack.supervisor import Supervisor\n"
    "sys.exit(Supervisor(load_settings(), modules=['xcstack.crypto.capability']).run())\n"
)


async def _ping_pid(c: OwnerClient, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            meta, _ = await c.call("ping")
            return int(meta["pid"])
        except (CryptoUnavailable, CryptoTimeout):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SERVE], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.slow
async def test_supervisor_respawns_killed_owner(data_dir: Path) -> None:
    env = owner_env(data_dir, XC_SERVER__PORT=str(free_port()), XC_SERVER__WORKERS="1")
    proc = _start(env)
    settings = load_settings(None, data_dir=data_dir, crypto={"call_timeout_s": 2.0})
    c = OwnerClient(socket_path(settings), settings.crypto)
    try:
        pid1 = await _ping_pid(c, 60)
        await c.create_key("sup", "sm2")
        sig = await c.sign("sup", b"before")
        os.kill(pid1, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            await c.sign("sup", b"during")  # either fails fast (retriable) or lands on the new owner
        except (CryptoUnavailable, CryptoTimeout) as exc:
            assert exc.status == 503
        assert time.monotonic() - t0 < 3.0
        pid2 = await _ping_pid(c, 30)
        assert pid2 != pid1
        assert await c.verify("sup", b"before", sig)  # same keystore, same key after respawn
    finally:
        await c.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
