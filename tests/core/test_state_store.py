"""The state store on SQLite (default) and the real PostgreSQL: migrations, transactions, loop safety."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from xcstack.state.store import StateStore, Tx

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    s = StateStore(None if request.param == "sqlite" else PG_URL, tmp_path)
    yield s
    await s.close()


def migrations(table: str) -> list[str | dict[str, str]]:
    return [
        f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
        {
            "sqlite": f"ALTER TABLE {table} ADD COLUMN score REAL DEFAULT 0",
            "postgres": f"ALTER TABLE {table} ADD COLUMN score DOUBLE PRECISION DEFAULT 0",
        },
    ]


async def test_migrations_are_versioned_and_idempotent(store: StateStore) -> None:
    ns = "t_" + uuid.uuid4().hex[:8]
    table = ns + "_items"
    try:
        assert await store.migrate(ns, migrations(table)[:1]) == 1
        assert await store.migrate(ns, migrations(table)[:1]) == 1  # nothing re-applied
        assert await store.migrate(ns, migrations(table)) == 2  # only the new one applied
        await store.execute(f"INSERT INTO {table} (id, name, score) VALUES (?, ?, ?)", (1, "a", 0.5))
        assert await store.fetchall(f"SELECT id, name, score FROM {table}") == [{"id": 1, "name": "a", "score": 0.5}]
    finally:
        await store.execute(f"DROP TABLE IF EXISTS {table}")
        await store.execute("DELETE FROM xc_schema_version WHERE namespace = ?", (ns,))


async def test_transaction_rolls_back_on_error(store: StateStore) -> None:
    ns = "t_" + uuid.uuid4().hex[:8]
    table = ns + "_items"
    await store.migrate(ns, migrations(table))
    try:
        def two_inserts(tx: Tx) -> None:
            tx.execute(f"INSERT INTO {table} (id, name) VALUES (?, ?)", (1, "x"))
            tx.execute(f"INSERT INTO {table} (id, name) VALUES (?, ?)", (2, "x"))  # unique violation

        with pytest.raises(Exception, match=r"(?i)unique"):
            await store.transaction(two_inserts)
        assert await store.fetchone(f"SELECT COUNT(*) AS n FROM {table}") == {"n": 0}
    finally:
        await store.execute(f"DROP TABLE IF EXISTS {table}")
        await store.execute("DELETE FROM xc_schema_version WHERE namespace = ?", (ns,))


async def test_concurrent_writers_lose_nothing(store: StateStore) -> None:
    ns = "t_" + uuid.uuid4().hex[:8]
    table = ns + "_items"
    await store.migrate(ns, migrations(table))
    try:
        await asyncio.gather(*(
            store.execute(f"INSERT INTO {table} (id, name) VALUES (?, ?)", (i, f"n{i}")) for i in range(200)
        ))
        assert await store.fetchone(f"SELECT COUNT(*) AS n FROM {table}") == {"n": 200}
    finally:
        await store.execute(f"DROP TABLE IF EXISTS {table}")
        await store.execute("DELETE FROM xc_schema_version WHERE namespace = ?", (ns,))


async def test_blocking_work_never_runs_on_the_loop(tmp_path: Path) -> None:
    store = StateStore(None, tmp_path)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    t0 = time.monotonic()
    await store.transaction(lambda tx: time.sleep(0.5))
    elapsed = time.monotonic() - t0
    task.cancel()
    await store.close()
    assert elapsed >= 0.5
    assert ticks >= 25, f"the loop ran only {ticks} ticks during a 0.5 s blocking transaction"


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = StateStore(None, tmp_path)
    try:
        assert await store.fetchone("PRAGMA journal_mode") == {"journal_mode": "wal"}
        assert (tmp_path / "state.db").exists()
    finally:
        await store.close()
