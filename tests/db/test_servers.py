"""The bridge against the real servers here: PostgreSQL (psycopg 3), KingbaseES's driver (ksycopg2,
against the same PostgreSQL) and MariaDB (pymysql). Injection, constraint errors, slow queries
cancelled server-side, connections killed server-side mid-load."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from tests.db.conftest import MY_DSN, PG_DSN, item_queries, my_admin_query, pg_admin_query, running_bridge, until
from xcstack.db.bridge import Bridge
from xcstack.errors import Conflict, GatewayTimeout, Overloaded

KINDS = ["postgres", "kingbase", "mysql", "mysqlclient"]
_n = itertools.count()


def _cfg(kind: str, **kw: Any) -> dict[str, Any]:
    if kind in ("mysql", "mysqlclient"):
        dsn, sleep, qk = MY_DSN, "SELECT SLEEP(:s) AS slept", "my"
    else:
        dsn, sleep, qk = PG_DSN, "SELECT pg_sleep(:s)::text AS slept", "pg"
    name = f"{kind}{next(_n)}"
    return {name: {"driver": kind, "dsn": dsn, "queries": item_queries(sleep_sql=sleep, kind=qk), **kw}}


@pytest.fixture(params=KINDS)
async def bridge(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Bridge]]:
    kind = request.param
    request.getfixturevalue("mysql" if kind.startswith("mysql") else "pg")
    if kind == "kingbase":
        pytest.importorskip("ksycopg2")
    if kind == "mysqlclient":
        pytest.importorskip("MySQLdb", reason="optional mysqlclient not installed: pip install 'xcstack[mysqlclient]'")
    cfg = _cfg(kind, pool_size=4, reconnect_backoff_initial_s=0.02, reconnect_backoff_max_s=0.5)
    async with running_bridge(cfg) as b:
        yield kind, b


def running(kind: str, ids: list[Any], needle: str) -> list[Any]:
    """Server sessions among `ids` that are still running a statement containing `needle`."""
    if not ids:
        return []
    if kind.startswith("mysql"):
        rows = my_admin_query(
            "SELECT ID, INFO FROM information_schema.PROCESSLIST WHERE ID IN (" + ",".join(str(int(i)) for i in ids)
            + ") AND INFO LIKE %s", f"%{needle}%")
    else:
        rows = pg_admin_query(
            "SELECT pid, query FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active' AND query LIKE %s",
            list(ids), f"%{needle}%")
    return [r[0] for r in rows]


def alive(kind: str, ids: list[Any]) -> list[Any]:
    if not ids:
        return []
    if kind.startswith("mysql"):
        rows = my_admin_query("SELECT ID FROM information_schema.PROCESSLIST WHERE ID IN ("
                              + ",".join(str(int(i)) for i in ids) + ")")
    else:
        rows = pg_admin_query("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", list(ids))
    return [r[0] for r in rows]


def kill(kind: str, ids: list[Any]) -> None:
    for i in ids:
        if kind.startswith("mysql"):
            try:
                my_admin_query(f"KILL {int(i)}")
            except Exception:  # already gone
                pass
        else:
            pg_admin_query("SELECT pg_terminate_backend(%s)", i)


def name_of(b: Bridge) -> str:
    return next(iter(b.databases))


async def test_roundtrip_and_types(bridge: tuple[str, Bridge]) -> None:
    kind, b = bridge
    db = b.database(name_of(b))
    r = await db.query("item", {"id": 7})
    assert r.columns == ["id", "name", "price"] and r.rows[0][:2] == (7, "item 7")
    assert Decimal(str(r.rows[0][2])) == Decimal("10.50")
    r = await db.query("range", {"lo": 1, "hi": 1000})
    assert len(r.rows) == 100 and r.truncated
    sessions = db.sessions()[0]
    assert len(sessions) == 4 and len(set(sessions)) == 4 and alive(kind, sessions)


@pytest.mark.parametrize(
    "evil",
    ["x' OR '1'='1", "'; DROP TABLE xcdb_items; --", "\\'; SELECT 1; --", "%s %(v)s $1 :v ? %%", "\u2019 OR 1=1 #"],
)
async def test_injection_stays_data(bridge: tuple[str, Bridge], evil: str) -> None:
    _, b = bridge
    db = b.database(name_of(b))
    assert (await db.query("by_name", {"name": evil})).rows == []
    assert (await db.query("echo", {"v": evil})).rows == [(evil,)]
    assert (await db.query("item", {"id": 1})).rows  # the table is still there


async def test_constraint_violation_is_409(bridge: tuple[str, Bridge]) -> None:
    _, b = bridge
    db = b.database(name_of(b))
    with pytest.raises(Conflict) as ei:
        await db.query("dup", {"id": 1})
    assert ei.value.code == "constraint_violation" and "INSERT" not in ei.value.message
    note = f"tx-{uuid.uuid4().hex[:8]}"
    with pytest.raises(Conflict):
        await db.query("pair", {"note": note, "id": 2})  # 2nd statement fails: the 1st is rolled back
    assert (await db.query("count_log", {"note": note})).rows[0][0] == 0
    assert (await db.query("item", {"id": 2})).rows  # the connection is fine afterwards


async def test_slow_query_is_cancelled_server_side(bridge: tuple[str, Bridge]) -> None:
    kind, b = bridge
    db = b.database(name_of(b))
    old = list(db.sessions()[0])
    t0 = time.monotonic()
    results = await asyncio.gather(*(db.query("sleep", {"s": 20}) for _ in range(2)), return_exceptions=True)
    assert all(isinstance(r, GatewayTimeout) and r.code == "query_timeout" for r in results), results
    assert time.monotonic() - t0 < 2.0
    needle = "SLEEP(" if kind.startswith("mysql") else "pg_sleep"
    # the statements stop on the server (cancel / KILL QUERY), long before their 20 s
    assert await until(lambda: not running(kind, old, needle), timeout=5), running(kind, old, needle)
    # and the cancelled connections are not reused: two sessions were replaced
    assert await until(lambda: len(set(old) - set(db.sessions()[0])) == 2 and len(db.sessions()[0]) == 4, timeout=5)
    new = db.sessions()[0]
    assert await until(lambda: len(alive(kind, list(set(old) - set(new)))) == 0, timeout=5)
    r = await db.query("sleep", {"s": 0})
    assert r.rows and all(s in new for s in db.sessions()[0]), (new, db.sessions())


async def test_killed_connections_mid_load_recover(bridge: tuple[str, Bridge]) -> None:
    kind, b = bridge
    db = b.database(name_of(b))
    outcomes: dict[str, int] = {}
    notes: list[str] = []

    async def one(i: int) -> None:
        try:
            if i % 5 == 0:
                note = f"kill-{uuid.uuid4().hex}"
                notes.append(note)
                await db.query("log", {"note": note})
            else:
                await db.query("item", {"id": 1 + i % 100})
            key = "ok"
        except Overloaded as exc:
            key = exc.code
        outcomes[key] = outcomes.get(key, 0) + 1

    async def load(n: int) -> None:
        sem = asyncio.Semaphore(12)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(n)))

    async def killer() -> None:
        for _ in range(3):
            await asyncio.sleep(0.05)
            await asyncio.to_thread(kill, kind, db.sessions()[0])

    await asyncio.gather(load(400), killer())
    assert set(outcomes) <= {"ok", "db_connection_lost", "db_unavailable"}, outcomes
    assert outcomes.get("ok", 0) > 200, outcomes
    # every writer's row exists at most once: a write is never retried blindly
    for note in notes[:20]:
        assert (await db.query("count_log", {"note": note})).rows[0][0] <= 1
    # the pool recovers by itself: every connection live again, every query answers
    assert await until(lambda: sum(db.live()) == 4, timeout=10)
    for i in range(40):
        assert (await db.query("item", {"id": 1 + i})).rows


async def test_read_only_queries_are_retried_on_a_fresh_connection(bridge: tuple[str, Bridge]) -> None:
    kind, b = bridge
    db = b.database(name_of(b))
    await asyncio.to_thread(kill, kind, db.sessions()[0])  # every idle connection is now dead
    await asyncio.sleep(0.2)
    for i in range(8):  # more than the pool: every worker meets its dead connection once
        assert (await db.query("item", {"id": 1 + i})).rows
    with pytest.raises(Overloaded) as ei:  # a write on a dead connection is not retried
        await asyncio.to_thread(kill, kind, db.sessions()[0])
        await asyncio.sleep(0.2)
        for _ in range(8):
            await db.query("log", {"note": "after-kill"})
    assert ei.value.code == "db_connection_lost"


async def test_stream_over_server_cursor(bridge: tuple[str, Bridge]) -> None:
    _, b = bridge
    name = name_of(b)
    db = b.database(name)
    stream = await db.stream("range", {"lo": 1, "hi": 5000})
    total = 0
    async for rows in stream:
        total += len(rows)
    assert total == 5000 and stream.finished
    # an early close cancels the statement and replaces the connection; the pool stays whole
    stream = await db.stream("range", {"lo": 1, "hi": 5000})
    await stream.__anext__()
    await stream.aclose()
    assert await until(lambda: sum(db.live()) == 4, timeout=5)
    assert (await db.query("item", {"id": 3})).rows


@pytest.mark.parametrize("kind", ["postgres", "kingbase"])
async def test_value_rejected_by_database_is_400(pg: str, kind: str) -> None:
    from xcstack.errors import BadRequest

    if kind == "kingbase":
        pytest.importorskip("ksycopg2")
    cfg = {f"v{kind}": {"driver": kind, "dsn": PG_DSN, "pool_size": 1, "queries": {
        "as_int": {"sql": "SELECT CAST(:v AS int) AS n", "params": {"v": {"type": "str"}}},
        "setting": {"sql": "SELECT current_setting('statement_timeout') AS t"}}}}
    async with running_bridge(cfg) as b:
        db = b.database(f"v{kind}")
        assert (await db.query("as_int", {"v": "42"})).rows == [(42,)]
        with pytest.raises(BadRequest) as ei:
            await db.query("as_int", {"v": "forty-two"})
        assert ei.value.code == "invalid_parameter_value" and ei.value.status == 400
        assert (await db.query("as_int", {"v": "7"})).rows == [(7,)]  # the connection is fine
        # a server-side statement_timeout backs the bridge's own timeouts (if the process dies mid-query)
        assert (await db.query("setting")).rows[0][0] not in ("0", "0ms", "")


async def test_idle_connections_heal_without_traffic(pg: str) -> None:
    cfg = {"heal": {"driver": "postgres", "dsn": PG_DSN, "pool_size": 2, "health_interval_s": 0.2,
                    "reconnect_backoff_initial_s": 0.02, "queries": {"one": {"sql": "SELECT 1 AS one"}}}}
    async with running_bridge(cfg) as b:
        db = b.database("heal")
        old = list(db.sessions()[0])
        await asyncio.to_thread(kill, "postgres", old)
        # no query is sent: the idle workers' own health checks find the dead connections
        assert await until(lambda: len(set(db.sessions()[0]) - set(old)) == 2 and sum(db.live()) == 2, timeout=5)
        assert (await db.query("one")).rows == [(1,)]


async def test_prepared_statements_can_be_turned_off(pg: str) -> None:
    for prepare in (True, False):
        queries = item_queries(sleep_sql="SELECT pg_sleep(:s)::text AS slept")
        queries["prepared"] = {"sql": "SELECT count(*) AS n FROM pg_prepared_statements"}
        cfg = {f"prep{int(prepare)}": {"driver": "postgres", "dsn": PG_DSN, "pool_size": 1,
                                       "prepare_statements": prepare, "queries": queries}}
        async with running_bridge(cfg) as b:
            db = b.database(f"prep{int(prepare)}")
            for i in range(8):  # one connection: psycopg prepares after 5 runs of the same query
                await db.query("item", {"id": i + 1})
            prepared = (await db.query("prepared")).rows[0][0]
            assert (prepared > 0) is prepare, prepared


async def test_loop_stays_responsive_under_mixed_load(pg: str) -> None:
    """Point selects, timeouts with cancels and killed connections at once: the loop never blocks."""
    cfg = _cfg("postgres", pool_size=4, reconnect_backoff_initial_s=0.02)
    async with running_bridge(cfg) as b:
        db = b.database(name_of(b))
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t - 0.005)

        async def reads() -> None:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                try:
                    await db.query("item", {"id": 1 + int(time.monotonic() * 1000) % 500})
                except Overloaded:
                    pass

        async def slow() -> None:
            for _ in range(3):
                with contextlib.suppress(GatewayTimeout):
                    await db.query("sleep", {"s": 5})

        async def killer() -> None:
            await asyncio.sleep(0.7)
            await asyncio.to_thread(kill, "postgres", db.sessions()[0][:2])

        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(*(reads() for _ in range(16)), slow(), killer())
        stop.set()
        await tick
        lags.sort()
        p99 = lags[int(len(lags) * 0.99)]
        assert len(lags) > 50 and p99 < 0.05, (p99, lags[-5:])
