"""Restart the database server: the bridge fails fast while it is down and recovers by itself.

The shared servers are never restarted: each test starts a private throwaway server (its own
PostgreSQL cluster via initdb/pg_ctl, its own MariaDB via mariadb-install-db/mariadbd) on a free
port under a temp dir, stops it and starts it again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.db.conftest import free_port, running_bridge, until
from xcstack.errors import Overloaded

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_owner(user: str | None, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    if user and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw)


class PrivateServer:
    def __init__(self, start: Callable[[], None], stop: Callable[[], None], dsn: str) -> None:
        self.start, self.stop, self.dsn = start, stop, dsn


@pytest.fixture
def private_pg() -> Iterator[PrivateServer]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server binaries (initdb/pg_ctl) not installed")
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="xcdb_pg_"))
    data = root / "data"
    if user:
        shutil.chown(root, user)
    port = free_port()
    _as_owner(user, [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                     "--no-instructions"])
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start() -> None:
        _as_owner(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w",
                         "start"])

    def stop() -> None:
        _as_owner(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])

    start()
    try:
        yield PrivateServer(start, stop, f"host=127.0.0.1 port={port} user=postgres dbname=postgres")
    finally:
        try:
            stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_mariadb() -> Iterator[PrivateServer]:
    install, daemon = shutil.which("mariadb-install-db"), shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    if not install or not Path(daemon).exists():
        pytest.skip("MariaDB server binaries not installed")
    user = "mysql" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="xcdb_my_"))
    if user:
        shutil.chown(root, user)
    port = free_port()
    _as_owner(user, [install, "--no-defaults", f"--datadir={root}/data", "--auth-root-authentication-method=normal",
                     "--skip-test-db"])
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        cmd = [daemon, "--no-defaults", f"--datadir={root}/data", f"--socket={root}/sock", f"--port={port}",
               "--bind-address=127.0.0.1", f"--pid-file={root}/pid", "--skip-log-bin", "--innodb-buffer-pool-size=16M",
               "--skip-name-resolve"]
        if user:
            cmd.append(f"--user={user}")
        with open(root / "err.log", "ab") as err:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err))
        import pymysql

        for _ in range(200):
            try:
                pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=1).close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(f"private mariadbd did not start: {(root / 'err.log').read_text()[-2000:]}")

    def stop() -> None:
        p = procs.pop()
        p.terminate()
        p.wait(30)

    start()
    try:
        yield PrivateServer(start, stop, f"mysql://root@127.0.0.1:{port}/mysql")
    finally:
        while procs:
            stop()
        shutil.rmtree(root, ignore_errors=True)


async def _restart_cycle(server: PrivateServer, driver: str) -> None:
    cfg = {"priv": {"driver": driver, "dsn": server.dsn, "pool_size": 3, "connect_timeout_s": 2,
                    "reconnect_backoff_initial_s": 0.05, "reconnect_backoff_max_s": 0.5, "pool_wait_timeout_s": 1,
                    "queries": {"one": {"sql": "SELECT 1 AS one"}}}}
    async with running_bridge(cfg) as b:
        db = b.database("priv")
        assert (await db.query("one")).rows == [(1,)]
        await asyncio.to_thread(server.stop)
        # while it is down: every call fails fast with a retriable 503, none hangs
        codes = set()
        t0 = time.monotonic()
        for _ in range(10):
            try:
                await db.query("one")
                codes.add("ok")
            except Overloaded as exc:
                codes.add(exc.code)
                assert exc.headers.get("Retry-After")
        assert codes <= {"db_connection_lost", "db_unavailable"} and codes, codes
        assert time.monotonic() - t0 < 5
        assert await until(lambda: not b.ready()[0], timeout=5)
        await asyncio.to_thread(server.start)
        # and when it is back, the bridge reconnects by itself (backoff capped at 0.5 s)
        assert await until(lambda: b.ready()[0] and sum(db.live()) == 3, timeout=15), db.live()
        for _ in range(10):
            assert (await db.query("one")).rows == [(1,)]


async def test_postgres_restart(private_pg: PrivateServer) -> None:
    await _restart_cycle(private_pg, "postgres")


async def test_mariadb_restart(private_mariadb: PrivateServer) -> None:
    pytest.importorskip("pymysql")
    await _restart_cycle(private_mariadb, "mysql")
