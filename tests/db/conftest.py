"""Fixtures of the db tests: real PostgreSQL (db xcdb_test) and MariaDB (db xcdb_test), bridges,
and a served app on a real socket (uvicorn) for HTTP, streaming and disconnect tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from xcstack.db.bridge import Bridge
from xcstack.db.routes import build_routes
from xcstack.db.settings import DbSettings
from xcstack.errors import Forbidden, XCError

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=xcdb_test"
MY_DSN = "mysql://root@127.0.0.1:3306/xcdb_test"
MY_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS xcdb_items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2));
CREATE TABLE IF NOT EXISTS xcdb_log (id serial PRIMARY KEY, note text NOT NULL);
"""
MY_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS xcdb_items (id int PRIMARY KEY, name varchar(200) NOT NULL, price decimal(10,2))",
    "CREATE TABLE IF NOT EXISTS xcdb_log (id int AUTO_INCREMENT PRIMARY KEY, note varchar(200) NOT NULL)",
]


def _pg_ready() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'xcdb_test'").fetchone():
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute("CREATE DATABASE xcdb_test")
        with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(PG_SCHEMA)
            conn.execute(
                "INSERT INTO xcdb_items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 5000) g "
                "ON CONFLICT DO NOTHING"
            )
        return None
    except Exception as exc:
        return f"PostgreSQL at 127.0.0.1:5432 is not usable: {exc}"


def _my_ready() -> str | None:
    try:
        import pymysql

        conn = pymysql.connect(**MY_ADMIN, connect_timeout=3, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS xcdb_test")
                cur.execute("USE xcdb_test")
                for stmt in MY_SCHEMA:
                    cur.execute(stmt)
                cur.execute("SELECT COUNT(*) FROM xcdb_items")
                row = cur.fetchone()
                if row is not None and row[0] < 5000:
                    cur.execute(
                        "INSERT IGNORE INTO xcdb_items SELECT seq, CONCAT('item ', seq), seq * 1.5 "
                        "FROM seq_1_to_5000"
                    )
        finally:
            conn.close()
        return None
    except Exception as exc:
        return f"MariaDB at 127.0.0.1:3306 is not usable: {exc}"


@pytest.fixture(scope="session")
def pg() -> str:
    why = _pg_ready()
    if why:
        pytest.skip(why)
    return PG_DSN


@pytest.fixture(scope="session")
def mysql() -> str:
    why = _my_ready()
    if why:
        pytest.skip(why)
    return MY_DSN


def pg_admin_query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def my_admin_query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import pymysql

    conn = pymysql.connect(**MY_ADMIN, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def item_queries(*, sleep_sql: str, kind: str = "pg") -> dict[str, Any]:
    """The same named queries for PostgreSQL, KingbaseES and MariaDB."""
    cast = "::text" if kind == "pg" else ""
    return {
        "item": {"sql": "SELECT id, name, price FROM xcdb_items WHERE id = :id", "params": {"id": {"type": "int"}},
                 "max_rows": 1},
        "by_name": {"sql": "SELECT id, name FROM xcdb_items WHERE name = :name",
                    "params": {"name": {"type": "str", "max_length": 200}}},
        "echo": {"sql": f"SELECT :v{cast} AS v", "params": {"v": {"type": "str", "max_length": 10000}}},
        "range": {"sql": "SELECT id, name FROM xcdb_items WHERE id BETWEEN :lo AND :hi ORDER BY id",
                  "params": {"lo": {"type": "int", "min": 0}, "hi": {"type": "int", "max": 100000}},
                  "max_rows": 100},
        "sleep": {"sql": sleep_sql, "params": {"s": {"type": "float", "min": 0, "max": 60}}, "timeout_s": 0.5},
        "log": {"sql": "INSERT INTO xcdb_log (note) VALUES (:note)", "params": {"note": {"type": "str"}}},
        "dup": {"sql": "INSERT INTO xcdb_items (id, name) VALUES (:id, 'dup')", "params": {"id": {"type": "int"}}},
        "count_log": {"sql": "SELECT COUNT(*) AS n FROM xcdb_log WHERE note = :note",
                      "params": {"note": {"type": "str"}}},
        "pair": {"statements": ["INSERT INTO xcdb_log (note) VALUES (:note)",
                                "INSERT INTO xcdb_items (id, name) VALUES (:id, :note)"],
                 "params": {"note": {"type": "str"}, "id": {"type": "int"}}},
    }


@contextlib.asynccontextmanager
async def running_bridge(databases: dict[str, Any], wait: float = 5.0) -> AsyncIterator[Bridge]:
    bridge = Bridge(DbSettings.model_validate({"databases": databases}))
    await bridge.start(wait=wait)
    try:
        yield bridge
    finally:
        await bridge.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _xc_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, XCError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def make_app(bridge: Bridge, deny: set[str] | None = None, audit_log: list[Any] | None = None) -> Starlette:
    """My routes plus what app.py does for them (XCError -> JSON), a test authorizer and audit sink."""
    denied = deny or set()
    events = audit_log if audit_log is not None else []

    async def audit_sink(request: Request, action: str, resource: str, outcome: str, detail: Any) -> None:
        events.append((action, resource, outcome, detail))

    async def authorizer(request: Request, resource: str, action: str) -> None:
        if resource in denied:
            raise Forbidden(f"not allowed: {action} on {resource}", code="forbidden")

    app = Starlette(routes=build_routes(bridge, 64 * 1024), exception_handlers={XCError: _xc_error})

    class Inject:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            scope["xc.authorizer"] = authorizer
            scope["xc.audit"] = audit_sink
            await self.inner(scope, receive, send)

    app.add_middleware(Inject)
    return app


@contextlib.asynccontextmanager
async def serve(app: Any, lifespan: str = "off") -> AsyncIterator[str]:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan, loop="asyncio")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def until(cond: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        r = cond()
        if isinstance(r, Awaitable):
            r = await r
        if r:
            return True
        await asyncio.sleep(step)
    return False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sqlite_path(tmp_path: Any) -> Iterator[str]:
    yield str(tmp_path / "xcdb.sqlite")
