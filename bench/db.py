"""DB bridge benchmark: point-select by primary key at concurrency 64.

PostgreSQL: xcstack bridge (psycopg 3 sync in worker threads) vs asyncpg vs psycopg async.
MariaDB:    xcstack bridge (pymysql in worker threads)        vs aiomysql vs asyncmy.
Also: the bridge's added per-query latency over a direct sync driver call (c=1, p50/p99), and the
event-loop lag p99 while each peer runs (a 5 ms ticker). Every peer gets the same pool size.

The process is pinned the way `xcstack serve` pins http worker 0 (the tuning plan's CPU, server.pin_cpus
= true by default), so the loop and the bridge's threads share that core as they do in production; all
peers run in this one process and get the same pinning. XC_BENCH_DB_PIN=0 measures unpinned (on a
2-vCPU VM the bridge then pays cross-vCPU wake-ups: ~0.5-1.1x asyncpg instead of 1.6x).

    .venv/bin/python bench/db.py                 # 5 s per peer
    XC_BENCH_DB_SECONDS=20 XC_BENCH_DB_POOLS=4,8,16 .venv/bin/python bench/db.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import table, write_section
from xcstack.db.bridge import Bridge
from xcstack.db.settings import DbSettings

SECONDS = float(os.environ.get("XC_BENCH_DB_SECONDS", "5"))
CONC = int(os.environ.get("XC_BENCH_DB_CONCURRENCY", "64"))
POOLS = [int(x) for x in os.environ.get("XC_BENCH_DB_POOLS", "4,8").split(",")]
POOL = POOLS[0]
ROWS = 10_000
SEQ_N = int(os.environ.get("XC_BENCH_DB_SEQ", "3000"))
PIN = os.environ.get("XC_BENCH_DB_PIN", "1") != "0"

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=xcdb_test"
PG_URL = "postgresql://postgres@127.0.0.1:5432/xcdb_test"
MY = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "db": "xcdb_test"}
MY_DSN = "mysql://root@127.0.0.1:3306/xcdb_test"


def setup_pg() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'xcdb_test'").fetchone():
            c.execute("CREATE DATABASE xcdb_test")
    with psycopg.connect(PG_DSN, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS xcdb_bench (id int PRIMARY KEY, name text NOT NULL, v int NOT NULL)")
        c.execute(f"INSERT INTO xcdb_bench SELECT g, 'name ' || g, g % 97 FROM generate_series(1, {ROWS}) g "
                  "ON CONFLICT DO NOTHING")
        c.execute("ANALYZE xcdb_bench")


def setup_my() -> None:
    import pymysql

    c = pymysql.connect(host=MY["host"], port=MY["port"], user=MY["user"], autocommit=True)
    with c.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS xcdb_test")
        cur.execute("USE xcdb_test")
        cur.execute("CREATE TABLE IF NOT EXISTS xcdb_test.xcdb_bench "
                    "(id int PRIMARY KEY, name varchar(64) NOT NULL, v int NOT NULL)")
        cur.execute(f"INSERT IGNORE INTO xcdb_test.xcdb_bench SELECT seq, CONCAT('name ', seq), seq % 97 "
                    f"FROM seq_1_to_{ROWS}")
    c.close()


class Lag:
    """A 5 ms ticker: how late the loop runs it = how long something blocked the loop."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        clock = time.perf_counter  # uvloop's loop.time() has 1 ms resolution
        while True:
            t = clock()
            await asyncio.sleep(0.005)
            self.samples.append(max(0.0, clock() - t - 0.005))

    def __enter__(self) -> Lag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def p99_ms(self) -> float:
        return pct(self.samples, 0.99) * 1e3


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Peer:
    """A contender; `call=None` is the idle loop: its lag is the shared machine's noise floor."""

    def __init__(self, name: str, call: Callable[[int], Awaitable[Any]] | None) -> None:
        self.name = name
        self.call = call
        self.done = 0
        self.elapsed = 0.0
        self.lat: list[float] = []
        self.lag: list[float] = []

    @property
    def qps(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0


async def _segment(peer: Peer, seconds: float) -> None:
    if peer.call is None:
        with Lag() as lag:
            await asyncio.sleep(seconds)
        peer.lag += lag.samples
        return
    call = peer.call
    stop = False
    clock = time.perf_counter

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop:
            t = clock()
            await call(rnd.randint(1, ROWS))
            peer.lat.append(clock() - t)
            peer.done += 1

    loop = asyncio.get_running_loop()
    with Lag() as lag:
        tasks = [loop.create_task(worker(i)) for i in range(CONC)]
        before = peer.done
        t0 = clock()
        await asyncio.sleep(seconds)
        stop = True
        n = peer.done - before
        peer.elapsed += clock() - t0
        await asyncio.gather(*tasks)
        peer.done = before + n  # completions after the bell do not count
    peer.lag += lag.samples


async def run_interleaved(peers: list[Peer], seconds: float = SECONDS, segment: float = 1.0) -> None:
    """Peers take turns in 1 s segments until each had `seconds`: noise from the shared machine
    then hits all of them alike instead of whichever happened to run during a busy spell."""
    for p in peers:  # warm-up: connections, prepared statements
        if p.call is not None:
            await asyncio.gather(*(p.call(i + 1) for i in range(CONC * 4)))
    rounds = max(1, round(seconds / segment))
    for _ in range(rounds):
        for p in peers:
            await _segment(p, seconds / rounds)


def row(p: Peer) -> list[object]:
    if p.call is None:
        return [p.name, "–", "–", f"{pct(p.lag, 0.99) * 1e3:.2f}"]
    return [p.name, f"{p.qps:,.0f}", f"{pct(p.lat, 0.99) * 1e3:.2f}", f"{pct(p.lag, 0.99) * 1e3:.2f}"]


IDLE = "idle loop, no queries (machine noise floor)"


def bridge_settings(driver: str, dsn: str, sql: str) -> DbSettings:
    return DbSettings.model_validate({"databases": {"bench": {
        "driver": driver, "dsn": dsn, "pool_size": POOL, "health_interval_s": 0,
        "queries": {"get": {"sql": sql, "params": {"id": {"type": "int", "min": 1}}, "max_rows": 1}},
    }}})


async def added_latency(bridge: Bridge, direct: Callable[[int], Any]) -> tuple[float, float, float, float]:
    """p50/p99 of the bridge at c=1 and of the same driver called directly (no loop, no thread hop)."""
    db = bridge.database("bench")
    rnd = random.Random(7)
    b_lat: list[float] = []
    d_lat: list[float] = []
    for _ in range(200):
        await db.query("get", {"id": rnd.randint(1, ROWS)})
        direct(rnd.randint(1, ROWS))
    for _ in range(SEQ_N):  # interleaved, so machine noise hits both alike
        i = rnd.randint(1, ROWS)
        t = time.perf_counter()
        await db.query("get", {"id": i})
        b_lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        direct(i)
        d_lat.append(time.perf_counter() - t)
    return (statistics.median(b_lat) * 1e6, pct(b_lat, 0.99) * 1e6,
            statistics.median(d_lat) * 1e6, pct(d_lat, 0.99) * 1e6)


async def bench_pg() -> tuple[list[list[object]], dict[str, float]]:
    import asyncpg
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    setup_pg()
    res: dict[str, float] = {}
    sql = "SELECT id, name, v FROM xcdb_bench WHERE id = :id"
    bridge = Bridge(bridge_settings("postgres", PG_DSN, sql))
    await bridge.start()
    db = bridge.database("bench")
    pool = await asyncpg.create_pool(PG_URL, min_size=POOL, max_size=POOL)
    assert pool is not None
    apool = AsyncConnectionPool(PG_DSN, min_size=POOL, max_size=POOL, open=False, kwargs={"autocommit": True})
    await apool.open(wait=True)

    async def ps(i: int) -> Any:
        async with apool.connection() as conn:
            cur = await conn.execute("SELECT id, name, v FROM xcdb_bench WHERE id = %s", (i,))
            return await cur.fetchone()

    peers = [
        Peer("xcstack bridge (psycopg 3 sync, threads)", lambda i: db.query("get", {"id": i})),
        Peer("asyncpg (pool)", lambda i: pool.fetchrow("SELECT id, name, v FROM xcdb_bench WHERE id = $1", i)),
        Peer("psycopg 3 async (psycopg_pool)", ps),
        Peer(IDLE, None),
    ]
    try:
        await run_interleaved(peers)
        direct_conn = psycopg.connect(PG_DSN, autocommit=True)

        def direct(i: int) -> Any:
            return direct_conn.execute("SELECT id, name, v FROM xcdb_bench WHERE id = %(id)s", {"id": i}).fetchall()

        b50, b99, d50, d99 = await added_latency(bridge, direct)
        direct_conn.close()
    finally:
        await bridge.stop()
        await pool.close()
        await apool.close()
    res.update(bridge=peers[0].qps, asyncpg=peers[1].qps, psycopg_async=peers[2].qps,
               b50=b50, d50=d50, b99=b99, d99=d99, lag=pct(peers[0].lag, 0.99) * 1e3,
               peer_lag=pct(peers[1].lag, 0.99) * 1e3, idle_lag=pct(peers[3].lag, 0.99) * 1e3)
    return [row(p) for p in peers], res


async def bench_my() -> tuple[list[list[object]], dict[str, float]]:
    import aiomysql
    import pymysql

    setup_my()
    bridge = Bridge(bridge_settings("mysql", MY_DSN, "SELECT id, name, v FROM xcdb_bench WHERE id = :id"))
    await bridge.start()
    db = bridge.database("bench")
    pool = await aiomysql.create_pool(host=MY["host"], port=MY["port"], user=MY["user"], db=MY["db"],
                                      minsize=POOL, maxsize=POOL, autocommit=True)

    async def am(i: int) -> Any:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT id, name, v FROM xcdb_bench WHERE id = %s", (i,))
            return await cur.fetchone()

    peers = [Peer("xcstack bridge (pymysql, threads)", lambda i: db.query("get", {"id": i})),
             Peer("aiomysql (pool)", am)]
    bridge_c: Bridge | None = None
    try:
        import MySQLdb  # noqa: F401  (optional C driver: xcstack[mysqlclient])
    except ImportError:
        pass
    else:
        bridge_c = Bridge(bridge_settings("mysqlclient", MY_DSN, "SELECT id, name, v FROM xcdb_bench WHERE id = :id"))
        await bridge_c.start()
        db_c = bridge_c.database("bench")
        peers.append(Peer("xcstack bridge (mysqlclient, threads)", lambda i: db_c.query("get", {"id": i})))
    apool: Any = None
    try:
        import asyncmy
    except ImportError:
        asyncmy = None
    if asyncmy is not None:
        apool = await asyncmy.create_pool(host=MY["host"], port=MY["port"], user=MY["user"], db=MY["db"],
                                          minsize=POOL, maxsize=POOL, autocommit=True)

        async def amy(i: int) -> Any:
            async with apool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT id, name, v FROM xcdb_bench WHERE id = %s", (i,))
                return await cur.fetchone()

        peers.append(Peer("asyncmy (pool)", amy))
    peers.append(Peer(IDLE, None))
    try:
        await run_interleaved(peers)
        dconn = pymysql.connect(host=MY["host"], port=MY["port"], user=MY["user"], database=MY["db"], autocommit=True)

        def direct(i: int) -> Any:
            with dconn.cursor() as cur:
                cur.execute("SELECT id, name, v FROM xcdb_bench WHERE id = %(id)s", {"id": i})
                return cur.fetchall()

        b50, b99, d50, d99 = await added_latency(bridge, direct)
        dconn.close()
    finally:
        await bridge.stop()
        if bridge_c is not None:
            await bridge_c.stop()
        pool.close()
        await pool.wait_closed()
        if apool is not None:
            apool.close()
            await apool.wait_closed()
    res: dict[str, float] = {p.name.split(" ")[0]: p.qps for p in peers if p.call is not None}
    res["idle_lag"] = pct(peers[-1].lag, 0.99) * 1e3
    if bridge_c is not None:
        res["bridge_mysqlclient"] = peers[2].qps
    res.update(bridge=peers[0].qps, b50=b50, d50=d50, b99=b99, d99=d99, lag=pct(peers[0].lag, 0.99) * 1e3)
    return [row(p) for p in peers], res


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


async def thread_hop_floor(n: int = 3000) -> float:
    """p50 µs of an empty loop -> thread -> loop hand-off (queue put, then call_soon_threadsafe): the
    two wake-ups every bridge call needs, with no driver and no bridge code. On a VM a wake-up
    across vCPUs can cost tens of µs; this puts "added latency" in proportion."""
    import queue
    import threading

    loop = asyncio.get_running_loop()
    q: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (fut := q.get()) is not None:
            loop.call_soon_threadsafe(fut.set_result, None)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    lat = []
    for _ in range(n):
        fut: asyncio.Future[None] = loop.create_future()
        t0 = time.perf_counter()
        q.put(fut)
        await fut
        lat.append(time.perf_counter() - t0)
    q.put(None)
    t.join()
    return statistics.median(lat[n // 10 :]) * 1e6


def pin_like_http_worker() -> str:
    """Pin this process as `xcstack serve` pins http worker 0; a description for the report."""
    if not PIN:
        return "not pinned (XC_BENCH_DB_PIN=0)"
    from xcstack.config import load_settings
    from xcstack.platform.plan import derive_plan
    from xcstack.platform.probe import probe

    plan = derive_plan(probe(), load_settings())
    if plan.pin_current_process("http", 0):
        return f"pinned to CPU {plan.http_worker_cpus(0)} like http worker 0 of `xcstack serve`"
    return "not pinned (the tuning plan has no core for it)"


async def main() -> None:
    global POOL
    pinning = pin_like_http_worker()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    hdr = ["peer", "queries/s", "p99 ms", "loop lag p99 ms"]
    out = [f"Point-select by primary key (10k-row table), concurrency {CONC}, the same pool size for every "
           f"peer, {SECONDS:g} s per peer, event loop: {loop_name}; the benchmark process is {pinning} (all "
           "peers alike; the database servers are not pinned). 2-vCPU VM, database servers on the same "
           "machine: read the ratios within one run, not the absolute numbers."]
    hop = await thread_hop_floor()
    out += ["", f"Machine floor: an empty loop → thread → loop hand-off (the two wake-ups every bridge call "
            f"needs, no driver, no bridge code) takes p50 **{hop:.0f} µs** here."]
    summary: list[list[object]] = []
    for pool_size in POOLS:
        POOL = pool_size
        pg_rows, pg = await bench_pg()
        out += ["", f"**PostgreSQL 15, pool {POOL}**", "", table(hdr, pg_rows)]
        ratio = pg["bridge"] / pg["asyncpg"]
        added = pg["b50"] - pg["d50"]
        out += ["", f"Added latency at c=1 ({SEQ_N} queries, interleaved): bridge p50 {pg['b50']:.0f} µs / p99 "
                f"{pg['b99']:.0f} µs vs direct sync psycopg p50 {pg['d50']:.0f} µs / p99 {pg['d99']:.0f} µs "
                f"→ **added p50 {added:.0f} µs**."]
        summary += [
            [f"PostgreSQL pool {POOL}: bridge / asyncpg throughput", f"{ratio:.2f}x", "≥ 0.7x", verdict(ratio >= 0.7)],
            [f"PostgreSQL pool {POOL}: bridge / psycopg async throughput",
             f"{pg['bridge'] / pg['psycopg_async']:.2f}x", "–", "–"],
            [f"PostgreSQL pool {POOL}: bridge added p50 latency (empty thread hop: {hop:.0f} µs)", f"{added:.0f} µs",
             "< 150 µs", verdict(added < 150)],
            [f"PostgreSQL pool {POOL}: loop lag p99, bridge run (asyncpg run; idle loop)",
             f"{pg['lag']:.2f} ms ({pg['peer_lag']:.2f}; {pg['idle_lag']:.2f})", "< 5 ms", verdict(pg["lag"] < 5)],
        ]
        try:
            my_rows, my = await bench_my()
        except Exception as exc:  # MariaDB absent: PostgreSQL figures still stand
            out += ["", f"MariaDB: not measured ({type(exc).__name__}: {exc})"]
            continue
        out += ["", f"**MariaDB 10.11, pool {POOL}**", "", table(hdr, my_rows)]
        added_my = my["b50"] - my["d50"]
        out += ["", f"Added latency at c=1: bridge p50 {my['b50']:.0f} µs / p99 {my['b99']:.0f} µs vs direct "
                f"sync pymysql p50 {my['d50']:.0f} µs / p99 {my['d99']:.0f} µs → **added p50 {added_my:.0f} µs**."]
        best = max(v for k, v in my.items() if k in ("aiomysql", "asyncmy"))
        summary += [
            [f"MariaDB pool {POOL}: bridge / aiomysql throughput", f"{my['bridge'] / my['aiomysql']:.2f}x",
             "≥ 0.7x", verdict(my["bridge"] / my["aiomysql"] >= 0.7)],
            [f"MariaDB pool {POOL}: bridge / best async peer", f"{my['bridge'] / best:.2f}x", "–", "–"],
            *([[f"MariaDB pool {POOL}: bridge with mysqlclient / aiomysql",
                f"{my['bridge_mysqlclient'] / my['aiomysql']:.2f}x", "–", "–"],
               [f"MariaDB pool {POOL}: bridge with mysqlclient / best async peer",
                f"{my['bridge_mysqlclient'] / best:.2f}x", "–", "–"]] if "bridge_mysqlclient" in my else []),
            [f"MariaDB pool {POOL}: bridge added p50 latency (empty thread hop: {hop:.0f} µs)", f"{added_my:.0f} µs",
             "< 150 µs",
             verdict(added_my < 150)],
            [f"MariaDB pool {POOL}: loop lag p99, bridge run (idle loop)",
             f"{my['lag']:.2f} ms ({my['idle_lag']:.2f})", "< 5 ms", verdict(my["lag"] < 5)],
        ]
    out += ["", "**Targets**", "", table(["measure", "value", "target", ""], summary)]
    body = "## DB bridge (`bench/db.py`)\n\n" + "\n".join(out)
    print(body)
    if os.environ.get("XC_BENCH_NO_WRITE") != "1":
        write_section("db", "python bench/db.py", body)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(main())
