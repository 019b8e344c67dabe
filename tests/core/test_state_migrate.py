"""Nodes that start together on one database migrate it together: every one succeeds and each
migration runs once (issue 12, finding 14: the DELETE + INSERT of the version row raced, and a
migration's DDL could run twice)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psycopg

from xcstack.state.store import StateStore

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
NODES = 8
ROUNDS = 10


def _migrations() -> list[str | dict[str, str]]:
    """Schema changes plus one row per time migration 2 runs: the count tells how often it was applied."""
    return [
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        "CREATE TABLE applied (n INTEGER NOT NULL); INSERT INTO applied (n) VALUES (2)",
        {
            "sqlite": "ALTER TABLE items ADD COLUMN score REAL DEFAULT 0",
            "postgres": "ALTER TABLE items ADD COLUMN score DOUBLE PRECISION DEFAULT 0",
        },
        "INSERT INTO applied (n) VALUES (4)",
    ]


async def _migrate_together(stores: list[StateStore], upto: int) -> list[int | BaseException]:
    await asyncio.gather(*(s.fetchone("SELECT 1 AS one") for s in stores))  # connections open first
    todo = _migrations()[:upto]
    return await asyncio.gather(*(s.migrate("core", todo) for s in stores), return_exceptions=True)


async def test_postgres_nodes_migrating_a_fresh_schema_at_once() -> None:
    for _ in range(ROUNDS):
        schema = "mig_" + uuid.uuid4().hex[:12]
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        stores = [StateStore(url, Path("/nonexistent")) for _ in range(NODES)]
        try:
            results = await _migrate_together(stores, 3)  # fresh: also creates xc_schema_version
            assert results == [3] * NODES, results
            assert await stores[0].fetchall("SELECT n FROM applied") == [{"n": 2}]  # applied once
            # an upgrade on an existing schema: the data migration also runs once
            assert await _migrate_together(stores, 4) == [4] * NODES
            assert await stores[0].fetchall("SELECT n FROM applied ORDER BY n") == [{"n": 2}, {"n": 4}]
            assert await stores[0].fetchall("SELECT namespace, version FROM xc_schema_version") == [
                {"namespace": "core", "version": 4}
            ]
            assert await stores[1].migrate("core", _migrations()) == 4  # idempotent afterwards
            assert await stores[0].fetchone("SELECT COUNT(*) AS n FROM applied") == {"n": 2}
        finally:
            for s in stores:
                await s.close()
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_sqlite_nodes_migrating_a_fresh_file_at_once(tmp_path: Path) -> None:
    """SQLite was already serialised by BEGIN IMMEDIATE; kept so that stays true."""
    stores = [StateStore(None, tmp_path) for _ in range(NODES)]
    try:
        assert await _migrate_together(stores, 3) == [3] * NODES
        assert await _migrate_together(stores, 4) == [4] * NODES
        assert await stores[0].fetchall("SELECT n FROM applied ORDER BY n") == [{"n": 2}, {"n": 4}]
        assert await stores[0].fetchall("SELECT namespace, version FROM xc_schema_version") == [
            {"namespace": "core", "version": 4}
        ]
    finally:
        for s in stores:
            await s.close()
