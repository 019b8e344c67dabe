"""The async facade over blocking DB-API drivers: every configured database, by name.

`await bridge.query("main", "user_by_id", {"id": 1})`. Per database (`db/database.py`) and per shard,
a bounded pool of worker threads, each owning one connection for life (`db/pool.py`); the event
loop never calls a driver.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from xcstack.db import errors as dberr
from xcstack.db.database import Database, QueryResult
from xcstack.db.settings import DbSettings
from xcstack.security.secrets import SecretStore


class Bridge:
    """Every configured database. `await bridge.query("main", "user_by_id", {"id": 1})`."""

    def __init__(self, settings: DbSettings) -> None:
        self.settings = settings
        self._canceller = ThreadPoolExecutor(max_workers=4, thread_name_prefix="xc-db-cancel")
        self.databases: dict[str, Database] = {
            name: Database(name, cfg, self._canceller) for name, cfg in settings.databases.items()
        }

    def database(self, name: str) -> Database:
        db = self.databases.get(name)
        if db is None:
            raise dberr.unknown_database(name)
        return db

    async def query(
        self, database: str, name: Any = None, params: Any = None, *, timeout: float | None = None
    ) -> QueryResult:
        """`query("main", "user_by_id", {"id": 1})` or `query("main/user_by_id", {"id": 1})`."""
        if (name is None or isinstance(name, dict)) and "/" in database:
            database, name, params = *database.split("/", 1), name
        if not isinstance(name, str):
            raise dberr.unknown_query(database, str(name))
        return await self.database(database).query(name, params, timeout=timeout)

    async def start(self, wait: float = 5.0, secrets: SecretStore | None = None) -> None:
        """`secrets` (the security capability's store) resolves `secret:` references in DSNs; all of
        them are resolved before any connection is opened."""
        for db in self.databases.values():
            await db.resolve(secrets)
        await asyncio.gather(*(db.start(wait) for db in self.databases.values()))

    async def stop(self, timeout: float = 5.0) -> None:
        await asyncio.gather(*(db.stop(timeout) for db in self.databases.values()))
        self._canceller.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> tuple[bool, str]:
        down = [f"{db.name}#{i}" for db in self.databases.values() for i, n in enumerate(db.live()) if n == 0]
        if down:
            return False, f"no live connection: {', '.join(down)}"
        return True, "ok"
