"""The bridge on SQLite (no server needed): validation, caps, transactions, affinity, timeouts with
cancel, pool bounds, sharding, streaming backpressure, a loop that never blocks."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.db.conftest import running_bridge, until
from xcstack.db.profiles import SQLiteProfile
from xcstack.errors import BadRequest, Conflict, GatewayTimeout, NotFound, Overloaded

COUNT_TO = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n) SELECT count(*) AS n FROM c"


def queries() -> dict[str, Any]:
    return {
        "setup": {"statements": [
            "CREATE TABLE IF NOT EXISTS xcdb_kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS xcdb_seq (n INTEGER PRIMARY KEY)",
            "INSERT OR IGNORE INTO xcdb_seq (n) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c "
            "WHERE x < 3000) SELECT x FROM c"]},
        "put": {"sql": "INSERT INTO xcdb_kv (k, v) VALUES (:k, :v)",
                "params": {"k": {"type": "str", "max_length": 20, "pattern": "[a-z0-9_ ;'\\-=]+"},
                           "v": {"type": "int", "min": 0, "max": 1000}}},
        "get": {"sql": "SELECT k, v FROM xcdb_kv WHERE k = :k", "params": {"k": {"type": "str"}}},
        "seq": {"sql": "SELECT n FROM xcdb_seq WHERE n <= :upto ORDER BY n", "params": {"upto": {"type": "int"}},
                "max_rows": 10, "stream_max_rows": 2500},
        "count_to": {"sql": COUNT_TO, "params": {"n": {"type": "int"}}, "timeout_s": 0.3},
        "types": {"sql": "SELECT :i AS i, :f AS f, :b AS b, :s AS s, :d AS d, :e AS e, :o AS o",
                  "params": {"i": {"type": "int"}, "f": {"type": "float", "min": 0}, "b": {"type": "bool"},
                             "s": {"type": "str", "max_length": 5, "min_length": 1},
                             "d": {"type": "date"}, "e": {"type": "str", "enum": ["red", "blue"]},
                             "o": {"type": "int", "required": False, "nullable": True, "default": 7}}},
        "two": {"statements": ["INSERT INTO xcdb_kv (k, v) VALUES (:k, 1)",
                               "INSERT INTO xcdb_kv (k, v) VALUES (:k2, 2)"],
                "params": {"k": {"type": "str"}, "k2": {"type": "str"}}},
        "temp_create": {"sql": "CREATE TEMP TABLE IF NOT EXISTS xcdb_tmp (x INTEGER)"},
        "temp_put": {"sql": "INSERT INTO xcdb_tmp VALUES (:x)", "params": {"x": {"type": "int"}}},
        "temp_sum": {"sql": "SELECT SUM(x) AS s FROM xcdb_tmp"},
    }


def db_cfg(path: str, **kw: Any) -> dict[str, Any]:
    return {"lite": {"driver": "sqlite", "dsn": path, "queries": queries(), **kw}}


async def test_query_result_shapes_and_caps(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=2)) as b:
        await b.query("lite", "setup")
        r = await b.query("lite", "put", {"k": "a", "v": 1})
        assert r.columns is None and r.rowcount == 1
        r = await b.query("lite", "get", {"k": "a"})
        assert r.columns == ["k", "v"] and r.rows == [("a", 1)] and not r.truncated
        r = await b.query("lite", "seq", {"upto": 50})
        assert len(r.rows) == 10 and r.truncated  # max_rows = 10
        r = await b.query("lite", "seq", {"upto": 10})
        assert len(r.rows) == 10 and not r.truncated
        r = await b.query("lite", "types", {"i": 1, "f": 2, "b": True, "s": "x", "d": "2024-02-29", "e": "red"})
        assert r.rows == [(1, 2.0, 1, "x", "2024-02-29", "red", 7)]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({}, "'i': is required"),
        ({"i": "1"}, "'i': must be an integer"),
        ({"i": True}, "'i': must be an integer"),
        ({"i": 2**64}, "64-bit"),
        ({"f": -1.0}, "'f': must be >= 0"),
        ({"f": float("nan")}, "must be finite"),
        ({"b": 1}, "'b': must be true or false"),
        ({"s": ""}, "shorter than 1"),
        ({"s": "toolong"}, "longer than 5"),
        ({"s": "a\x00"}, "NUL"),
        ({"d": "2024-02-30"}, "'d': is not a valid date"),
        ({"e": "green"}, "must be one of"),
        ({"i": None}, "must not be null"),
        ({"zzz": 1}, "unknown parameter(s) ['zzz']"),
    ],
)
async def test_bad_parameters_are_400(sqlite_path: str, params: dict[str, Any], fragment: str) -> None:
    good = {"i": 1, "f": 2, "b": True, "s": "x", "d": "2024-02-29", "e": "red"}
    async with running_bridge(db_cfg(sqlite_path, pool_size=1)) as b:
        merged = {**good, **params} if params else {}
        for k, v in params.items():
            if v is None:
                merged[k] = None
        with pytest.raises(BadRequest) as ei:
            await b.query("lite", "types", merged)
        assert ei.value.code == "invalid_parameter" and ei.value.status == 400
        assert fragment in ei.value.message, ei.value.message


async def test_unknown_names_are_404(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1)) as b:
        await b.query("lite/setup")  # the "database/query" form
        assert (await b.query("lite/get", {"k": "none"})).rows == []
        with pytest.raises(BadRequest) as bad:
            await b.database("lite").stream("put", {"k": "a", "v": 1})  # writes never stream
        assert bad.value.code == "not_streamable"
        with pytest.raises(NotFound) as ei:
            await b.query("lite", "nope")
        assert ei.value.code == "unknown_query"
        with pytest.raises(NotFound) as ei:
            await b.query("nodb", "get")
        assert ei.value.code == "unknown_database"


async def test_injection_stays_data(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1)) as b:
        await b.query("lite", "setup")
        evil = "x'; drop table xcdb_kv; --"
        await b.query("lite", "put", {"k": evil[:20], "v": 3})
        r = await b.query("lite", "get", {"k": evil[:20]})
        assert r.rows == [(evil[:20], 3)]
        r = await b.query("lite", "get", {"k": "' OR '1'='1"})
        assert r.rows == []


async def test_named_transaction_is_atomic(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1)) as b:
        await b.query("lite", "setup")
        await b.query("lite", "put", {"k": "taken", "v": 1})
        with pytest.raises(Conflict) as ei:
            await b.query("lite", "two", {"k": "fresh", "k2": "taken"})  # 2nd statement violates the key
        assert ei.value.code == "constraint_violation"
        assert (await b.query("lite", "get", {"k": "fresh"})).rows == []  # 1st was rolled back
        r = await b.query("lite", "two", {"k": "p", "k2": "q"})
        assert r.rowcount == 2


async def test_python_transaction_keeps_one_connection(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=4)) as b:
        db = b.database("lite")
        await db.query("setup")
        async with db.transaction() as tx:
            await tx.query("temp_create")  # TEMP tables exist only on their own connection
            for x in (1, 2, 3):
                await tx.query("temp_put", {"x": x})
            assert (await tx.query("temp_sum")).rows == [(6,)]
            await tx.query("put", {"k": "in-tx", "v": 5})
        assert (await db.query("get", {"k": "in-tx"})).rows == [("in-tx", 5)]
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await tx.query("put", {"k": "rolled", "v": 5})
                raise RuntimeError("boom")
        assert (await db.query("get", {"k": "rolled"})).rows == []
        assert await until(lambda: db.pools[0].idle_workers() == 4)  # every worker is free again, none pinned


async def test_idle_transaction_is_rolled_back_and_closed(sqlite_path: str) -> None:
    from xcstack.db.errors import DbError

    async with running_bridge(db_cfg(sqlite_path, pool_size=2, transaction_idle_timeout_s=0.3)) as b:
        db = b.database("lite")
        await db.query("setup")
        with pytest.raises(DbError) as exit_error:
            async with db.transaction() as tx:
                await tx.query("put", {"k": "idle-tx", "v": 1})
                await asyncio.sleep(0.8)  # the caller forgot its transaction
                with pytest.raises(DbError) as ei:
                    await tx.query("put", {"k": "after", "v": 2})
                assert ei.value.code == "transaction_closed"
        assert exit_error.value.code == "transaction_closed"  # the block cannot end as if committed
        assert (await db.query("get", {"k": "idle-tx"})).rows == []  # rolled back
        assert (await db.query("get", {"k": "after"})).rows == []  # never ran in autocommit
        assert await until(lambda: db.pools[0].idle_workers() == 2)


async def test_connections_never_cross_threads(sqlite_path: str) -> None:
    """sqlite3 connections are thread-checked: any use outside the owner thread would raise."""
    async with running_bridge(db_cfg(sqlite_path, pool_size=3)) as b:
        db = b.database("lite")
        await db.query("setup")
        results = await asyncio.gather(*(db.query("get", {"k": str(i)}) for i in range(300)))
        assert len(results) == 300
        for w in db.pools[0].workers:
            assert w.is_alive() and w.conn is not None


async def test_timeout_interrupts_and_replaces_connection(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1)) as b:
        db = b.database("lite")
        before = db.pools[0].workers[0].conn
        t0 = time.monotonic()
        with pytest.raises(GatewayTimeout) as ei:
            await db.query("count_to", {"n": 10**10})
        assert ei.value.code == "query_timeout" and time.monotonic() - t0 < 1.0
        r = await db.query("count_to", {"n": 10})  # the next query runs, on a fresh connection
        assert r.rows == [(10,)]
        assert db.pools[0].workers[0].conn is not before


async def test_cancelled_caller_cancels_statement(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1)) as b:
        db = b.database("lite")
        task = asyncio.ensure_future(db.query("count_to", {"n": 10**10}, timeout=30))
        await asyncio.sleep(0.2)
        before = db.pools[0].workers[0].conn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        r = await db.query("count_to", {"n": 5})
        assert r.rows == [(5,)] and time.monotonic() - t0 < 2.0  # interrupted, not run to the end
        assert db.pools[0].workers[0].conn is not before


async def test_pool_wait_is_bounded(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1, pool_wait_timeout_s=0.2)) as b:
        db = b.database("lite")
        busy = asyncio.ensure_future(db.query("count_to", {"n": 10**10}, timeout=2))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(Overloaded) as ei:
            await db.query("count_to", {"n": 5})
        assert ei.value.code == "db_pool_exhausted" and ei.value.status == 503
        assert ei.value.headers["Retry-After"] == "1"
        assert 0.15 < time.monotonic() - t0 < 1.0
        busy.cancel()
    # a fresh file: the first pool's last connection may still hold the old one's WAL switch lock
    async with running_bridge(db_cfg(sqlite_path + ".2", pool_size=1, max_waiting=0)) as b:
        db = b.database("lite")
        assert b.ready()[0]
        busy = asyncio.ensure_future(db.query("count_to", {"n": 10**10}, timeout=2))
        await asyncio.sleep(0.05)
        assert not busy.done()
        t0 = time.monotonic()
        with pytest.raises(Overloaded):
            await db.query("count_to", {"n": 5})
        assert time.monotonic() - t0 < 0.05  # no waiting room: refused at once
        busy.cancel()


async def test_unreachable_database_is_503_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "no" / "such" / "dir" / "x.sqlite")
    async with running_bridge(db_cfg(path, pool_size=2, reconnect_backoff_initial_s=0.05), wait=2) as b:
        assert b.ready()[0] is False
        t0 = time.monotonic()
        with pytest.raises(Overloaded) as ei:
            await b.query("lite", "get", {"k": "a"})
        assert ei.value.code == "db_unavailable" and time.monotonic() - t0 < 0.1
        (tmp_path / "no" / "such" / "dir").mkdir(parents=True)  # the "server" comes back
        for _ in range(100):
            if b.ready()[0]:
                break
            await asyncio.sleep(0.05)
        await b.query("lite", "setup")
        assert (await b.query("lite", "get", {"k": "a"})).rows == []


async def test_loop_is_never_blocked(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=2)) as b:
        db = b.database("lite")
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.005)
                lags.append(loop.time() - t - 0.005)

        tick = asyncio.ensure_future(ticker())
        slow = [asyncio.ensure_future(db.query("count_to", {"n": 10**10}, timeout=0.6)) for _ in range(2)]
        await asyncio.gather(*slow, return_exceptions=True)
        stop.set()
        await tick
        assert len(lags) > 20 and max(lags) < 0.1, max(lags)


async def test_sharding_routes_by_crc32(tmp_path: Path) -> None:
    shards = [str(tmp_path / f"s{i}.sqlite") for i in range(3)]
    for s in shards:
        c = sqlite3.connect(s)
        c.execute("CREATE TABLE xcdb_users (id TEXT PRIMARY KEY, shard INTEGER)")
        c.close()
    cfg = {"users": {"driver": "sqlite", "shards": shards, "pool_size": 1, "queries": {
        "add": {"sql": "INSERT INTO xcdb_users VALUES (:id, :shard)", "shard_key": "id",
                "params": {"id": {"type": "str"}, "shard": {"type": "int"}}},
        "get": {"sql": "SELECT id, shard FROM xcdb_users WHERE id = :id", "shard_key": "id",
                "params": {"id": {"type": "str"}}},
        "all": {"sql": "SELECT id, shard FROM xcdb_users ORDER BY id", "fan_out": True, "max_rows": 1000},
        "some": {"sql": "SELECT id, shard FROM xcdb_users ORDER BY id", "fan_out": True, "max_rows": 5},
    }}}
    ids = [f"user-{i}" for i in range(30)]
    async with running_bridge(cfg) as b:
        for uid in ids:
            await b.query("users", "add", {"id": uid, "shard": zlib.crc32(uid.encode()) % 3})
        for uid in ids:
            assert (await b.query("users", "get", {"id": uid})).rows == [(uid, zlib.crc32(uid.encode()) % 3)]
        everyone = await b.query("users", "all")  # fan-out: every shard at once
        assert sorted(r[0] for r in everyone.rows) == sorted(ids) and not everyone.truncated
        some = await b.query("users", "some")
        assert len(some.rows) == 5 and some.truncated
        db = b.database("users")
        with pytest.raises(BadRequest):
            await db.stream("all")
        with pytest.raises(BadRequest):
            db.transaction()  # a sharded transaction must name its shard
        async with db.transaction(shard_key="user-0") as tx:
            assert (await tx.query("get", {"id": "user-0"})).rows
            other = next(u for u in ids if db.shard_for(u) is not db.shard_for("user-0"))
            with pytest.raises(BadRequest):
                await tx.query("get", {"id": other})
    seen = set()
    for i, s in enumerate(shards):
        c = sqlite3.connect(s)
        rows = c.execute("SELECT id, shard FROM xcdb_users").fetchall()
        c.close()
        assert all(shard == i for _, shard in rows)
        seen |= {r[0] for r in rows}
    assert seen == set(ids)


async def test_stream_backpressure_and_early_close(sqlite_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pulled: list[int] = []
    orig = SQLiteProfile.stream

    def counting(self: Any, conn: Any, sql: Any, params: Any, batch: int) -> Any:
        cols, it = orig(self, conn, sql, params, batch)

        def gen() -> Any:
            for rows in it:
                pulled.append(len(rows))
                yield rows

        return cols, gen()

    monkeypatch.setattr(SQLiteProfile, "stream", counting)
    async with running_bridge(db_cfg(sqlite_path, pool_size=1, stream_batch_rows=100)) as b:
        db = b.database("lite")
        await db.query("setup")
        stream = await db.stream("seq", {"upto": 3000})
        assert stream.columns == ["n"]
        first = await stream.__anext__()
        assert first[0] == (1,) and len(first) == 100
        await asyncio.sleep(0.3)
        assert len(pulled) <= 2, pulled  # the worker waits for the consumer
        await stream.aclose()  # early close: statement abandoned, connection replaced
        total = 0
        stream = await db.stream("seq", {"upto": 3000})
        async for rows in stream:
            total += len(rows)
        assert total == 2500 and stream.truncated  # stream_max_rows
        stream = await db.stream("seq", {"upto": 250})
        got = [r async for batch in stream for r in batch]
        assert len(got) == 250 and stream.finished and not stream.truncated
        assert (await db.query("seq", {"upto": 3})).rows == [(1,), (2,), (3,)]


async def test_worker_threads_stop(sqlite_path: str) -> None:
    before = {t.name for t in threading.enumerate()}
    async with running_bridge(db_cfg(sqlite_path, pool_size=3)) as b:
        await b.query("lite", "setup")
    await asyncio.sleep(0.1)
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [n for n in left if n.startswith("xc-db-lite")], left


async def test_stream_consumer_idle_too_long(sqlite_path: str) -> None:
    async with running_bridge(db_cfg(sqlite_path, pool_size=1, stream_batch_rows=10, stream_idle_timeout_s=0.2)) as b:
        db = b.database("lite")
        await db.query("setup")
        stream = await db.stream("seq", {"upto": 100})
        assert len(await stream.__anext__()) == 10
        await asyncio.sleep(0.5)
        with pytest.raises(GatewayTimeout) as ei:
            await stream.__anext__()
        assert ei.value.code == "stream_idle_timeout"
        assert (await db.query("seq", {"upto": 2})).rows == [(1,), (2,)]  # the worker is back


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
async def test_worker_threads_run_nicer_than_the_loop(sqlite_path: str) -> None:
    def nice_of(tid: int) -> int:
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice

    main = nice_of(threading.get_native_id())
    async with running_bridge(db_cfg(sqlite_path, pool_size=2, worker_nice=5)) as b:
        await b.query("lite", "setup")
        tids = [w.native_id for w in b.database("lite").pools[0].workers]
        assert all(t is not None and nice_of(t) == min(19, main + 5) for t in tids)
        assert nice_of(threading.get_native_id()) == main  # the loop thread keeps its priority
