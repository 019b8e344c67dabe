"""DM8 and GBase 8s against real servers: these run only where one is reachable.

    XC_TEST_DM_DSN=dm://SYSDBA:password@host:5236/            (dmPython)
    XC_TEST_GBASE_DSN="SERVER=gbase01;DATABASE=testdb;HOST=host;SERVICE=9088;PROTOCOL=onsoctcp;UID=gbasedbt;PWD=..."
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import pytest

from tests.db.conftest import running_bridge
from xcstack.errors import Conflict, GatewayTimeout

SLOW_CROSS_JOIN = {
    "dm": "SELECT COUNT(*) AS n FROM SYSOBJECTS a, SYSOBJECTS b, SYSOBJECTS c, SYSOBJECTS d",
    "gbase8s": "SELECT COUNT(*) AS n FROM systables a, systables b, systables c, systables d, syscolumns e",
}


def _cfg(driver: str, dsn: str, table: str) -> dict[str, Any]:
    return {"dom": {"driver": driver, "dsn": dsn, "pool_size": 2, "queries": {
        "create": {"sql": f"CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(200) NOT NULL)"},
        "drop": {"sql": f"DROP TABLE {table}"},
        "put": {"sql": f"INSERT INTO {table} (id, name) VALUES (:id, :name)",
                "params": {"id": {"type": "int"}, "name": {"type": "str"}}},
        "get": {"sql": f"SELECT id, name FROM {table} WHERE name = :name", "params": {"name": {"type": "str"}}},
        "all": {"sql": f"SELECT id, name FROM {table} ORDER BY id"},
        "slow": {"sql": SLOW_CROSS_JOIN[driver], "timeout_s": 0.5, "read_only": True},
    }}}


async def _exercise(driver: str, dsn: str) -> None:
    table = f"xcdb_{uuid.uuid4().hex[:8]}"
    async with running_bridge(_cfg(driver, dsn, table)) as b:
        db = b.database("dom")
        assert b.ready()[0], "no connection to the server"
        await db.query("create")
        try:
            await db.query("put", {"id": 1, "name": "one"})
            evil = "x' OR '1'='1'; --"
            await db.query("put", {"id": 2, "name": evil})
            assert (await db.query("get", {"name": evil})).rows == [(2, evil)]
            assert (await db.query("get", {"name": "' OR '1'='1"})).rows == []
            with pytest.raises(Conflict):
                await db.query("put", {"id": 1, "name": "dup"})
            t0 = time.monotonic()
            with pytest.raises(GatewayTimeout):
                await db.query("slow")
            assert time.monotonic() - t0 < 2
            rows = [r async for batch in await db.stream("all") for r in batch]
            assert [r[0] for r in rows] == [1, 2]
        finally:
            await db.query("drop")


@pytest.mark.skipif(not os.environ.get("XC_TEST_DM_DSN"), reason="XC_TEST_DM_DSN not set (no DM8 server here)")
async def test_dm8_server() -> None:
    pytest.importorskip("dmPython")
    await _exercise("dm", os.environ["XC_TEST_DM_DSN"])


@pytest.mark.skipif(not os.environ.get("XC_TEST_GBASE_DSN"), reason="XC_TEST_GBASE_DSN not set (no GBase 8s here)")
async def test_gbase8s_server() -> None:
    pytest.importorskip("DbtPyDbi")
    await _exercise("gbase8s", os.environ["XC_TEST_GBASE_DSN"])
