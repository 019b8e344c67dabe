"""xcstack's own state (users, keys, jobs, cursors): SQLite (WAL) by default, PostgreSQL or
KingbaseES when `[state] url` says so.

Every call runs in a small dedicated thread pool where each thread owns its connection for life;
the event loop never touches a blocking driver. SQL is written once with `?` placeholders and
translated for PostgreSQL. Each capability registers its own versioned migrations under a
namespace; `migrate` applies the missing ones in order, each in a transaction.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]
Migration = str | Mapping[str, str]  # one SQL script, or {"sqlite": ..., "postgres": ...}


class Cursor(Protocol):
    rowcount: int

    def execute(self, sql: str, params: Params = ...) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class Tx:
    """A transaction handle given to `StateStore.transaction` callbacks (runs in the pool thread)."""

    def __init__(self, cur: Any, translate: Callable[[str], str]) -> None:
        self._cur = cur
        self._translate = translate

    def execute(self, sql: str, params: Params = ()) -> int:
        self._cur.execute(self._translate(sql), params)
        return int(self._cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        """One statement over many rows (the ledger's batches): sqlite3's executemany, psycopg's pipelined one."""
        if rows:
            self._cur.executemany(self._translate(sql), rows)

    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Bulk insert: COPY on PostgreSQL (several times executemany's rate), executemany on SQLite."""
        if not rows:
            return
        cols = ", ".join(columns)
        if hasattr(self._cur, "copy"):  # psycopg
            with self._cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        self._cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(columns))})", rows)

    def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        self._cur.execute(self._translate(sql), params)
        cols = [d[0] for d in self._cur.description or ()]
        return [dict(zip(cols, row, strict=True)) for row in self._cur.fetchall()]

    def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None


_QMARK = re.compile(r"\?")
#: PostgreSQL advisory lock that serialises schema migrations across processes ("xcstack" in ASCII)
MIGRATION_LOCK_KEY = 0x7863737461636B


class StateStore:
    """Async facade over a blocking SQL connection per pool thread."""

    def __init__(self, url: str | None, data_dir: Path, pool_size: int = 4) -> None:
        self.dialect = "postgres" if url and url.startswith(("postgresql://", "postgres://")) else "sqlite"
        if self.dialect == "sqlite":
            path = url[len("sqlite:///") :] if url else str(data_dir / "state.db")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._target = path
        else:
            self._target = url or ""
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="xc-state")
        self._closed = False

    # -- connection per thread -------------------------------------------------------------
    def _connect(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self._target, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
        else:
            import psycopg

            conn = psycopg.connect(self._target, autocommit=True)
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _translate(self, sql: str) -> str:
        return _QMARK.sub("%s", sql) if self.dialect == "postgres" else sql

    def _run_tx(self, fn: Callable[[Tx], T]) -> T:
        conn = self._connect()
        if self.dialect == "sqlite":
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = fn(Tx(cur, self._translate))
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return result
        with conn.transaction(), conn.cursor() as cur:
            return fn(Tx(cur, self._translate))

    async def transaction(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn(tx)` in one transaction on a pool thread (fn is blocking code, not a coroutine)."""
        if self._closed:
            raise RuntimeError("state store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run_tx, fn)

    async def execute(self, sql: str, params: Params = ()) -> int:
        return await self.transaction(lambda tx: tx.execute(sql, params))

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return await self.transaction(lambda tx: tx.fetchall(sql, params))

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        return await self.transaction(lambda tx: tx.fetchone(sql, params))

    # -- migrations --------------------------------------------------------------------------
    async def migrate(self, namespace: str, migrations: Sequence[Migration]) -> int:
        """Apply the migrations of `namespace` not yet applied; returns the resulting version.

        Nodes sharing one database may start together: the whole migration runs under one lock across
        processes (PostgreSQL: a transaction-scoped advisory lock; SQLite: the `BEGIN IMMEDIATE` write
        lock every transaction here takes), and the version is read only once the lock is held, so each
        migration's DDL runs exactly once and the others find it done."""

        def apply(tx: Tx) -> int:
            if self.dialect == "postgres":
                # before CREATE TABLE IF NOT EXISTS, which itself races (duplicate pg_type row)
                tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))
            tx.execute(
                "CREATE TABLE IF NOT EXISTS xc_schema_version (namespace TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = tx.fetchone("SELECT version FROM xc_schema_version WHERE namespace = ?", (namespace,))
            applied = current = int(row["version"]) if row else 0
            for version, migration in enumerate(migrations, start=1):
                if version <= current:
                    continue
                script = migration if isinstance(migration, str) else migration[self.dialect]
                for statement in _split_sql(script):
                    tx.execute(statement)
                current = version
            if current != applied or row is None:
                tx.execute(
                    "INSERT INTO xc_schema_version (namespace, version) VALUES (?, ?) "
                    "ON CONFLICT (namespace) DO UPDATE SET version = excluded.version",
                    (namespace, current),
                )
            return current

        return await self.transaction(apply)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close_all() -> None:
            with self._conns_lock:
                for conn in self._conns:
                    try:
                        conn.close()
                    except Exception:
                        pass
                self._conns.clear()

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, close_all)
        self._pool.shutdown(wait=False)


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def open_store(url: str | None, data_dir: Path, pool_size: int = 4) -> StateStore:
    return StateStore(url, data_dir, pool_size)
