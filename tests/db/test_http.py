"""`POST /v1/db/{database}/{query}` on a real socket: JSON rows, NDJSON streams with backpressure,
bad input -> 4xx JSON with stable codes, permission per query, client disconnect cancels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.db.conftest import PG_DSN, item_queries, make_app, pg_admin_query, running_bridge, serve, until
from xcstack.db.profiles import SQLiteProfile

SEQ = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n) "
       "SELECT x AS n, :pad AS pad FROM c")


def lite(path: str, **kw: Any) -> dict[str, Any]:
    return {"lite": {"driver": "sqlite", "dsn": path, "pool_size": 2, "stream_batch_rows": 100, "queries": {
        "seq": {"sql": SEQ, "params": {"n": {"type": "int", "min": 0, "max": 10**7},
                                       "pad": {"type": "str", "required": False, "default": "", "max_length": 4096}},
                "max_rows": 50, "stream_max_rows": 10**7},
        "capped": {"sql": SEQ, "params": {"n": {"type": "int"}, "pad": {"type": "str", "required": False,
                                                                         "default": ""}}, "stream_max_rows": 250},
        "secret": {"sql": "SELECT 42 AS answer", "permission": "query:lite/secret"},
        "code": {"sql": "SELECT :c AS c", "params": {"c": {"type": "str", "pattern": "[A-Z]{3}"}}},
        "mk": {"sql": "CREATE TABLE IF NOT EXISTS xcdb_w (k TEXT PRIMARY KEY)"},
        "slow": {"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000000) "
                        "SELECT count(*) AS n FROM c", "timeout_s": 1.0},
        "put": {"sql": "INSERT INTO xcdb_w (k) VALUES (:k)", "params": {"k": {"type": "str"}}},
    }, **kw}}


async def _post(session: aiohttp.ClientSession, url: str, body: Any = None, **kw: Any) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes | str) else json.dumps(body) if body is not None else None
    async with session.post(url, data=data, **kw) as r:
        raw = await r.read()
        return r.status, r.headers, raw


async def test_json_rows_and_errors(sqlite_path: str) -> None:
    async with running_bridge(lite(sqlite_path)) as b, serve(make_app(b, deny={"query:lite/secret"})) as base, \
            aiohttp.ClientSession() as s:
        st, _, raw = await _post(s, f"{base}/v1/db/lite/seq", {"params": {"n": 3}})
        assert st == 200
        body = json.loads(raw)
        assert body == {"database": "lite", "query": "seq", "columns": ["n", "pad"],
                        "rows": [{"n": 1, "pad": ""}, {"n": 2, "pad": ""}, {"n": 3, "pad": ""}],
                        "row_count": 3, "truncated": False}
        st, _, raw = await _post(s, f"{base}/v1/db/lite/seq", {"params": {"n": 80}})
        assert st == 200 and json.loads(raw)["row_count"] == 50 and json.loads(raw)["truncated"] is True

        cases: list[tuple[str, Any, int, str]] = [
            ("seq", {"params": {}}, 400, "invalid_parameter"),
            ("seq", {"params": {"n": "3"}}, 400, "invalid_parameter"),
            ("seq", {"params": {"n": -1}}, 400, "invalid_parameter"),
            ("seq", {"params": {"n": 1, "x": 2}}, 400, "invalid_parameter"),
            ("seq", {"sql": "DROP TABLE x"}, 400, "invalid_parameter"),  # clients never send SQL
            ("seq", {"params": [1]}, 400, "invalid_parameter"),
            ("seq", b"{not json", 400, "invalid_json"),
            ("code", {"params": {"c": "abc"}}, 400, "invalid_parameter"),
            ("seq", {"params": {"n": 1, "pad": "x" * 70000}}, 413, "payload_too_large"),
            ("nope", {"params": {}}, 404, "unknown_query"),
            ("secret", None, 403, "forbidden"),
        ]
        for query, body_in, status, code in cases:
            st, headers, raw = await _post(s, f"{base}/v1/db/lite/{query}", body_in)
            err = json.loads(raw)["error"]
            assert (st, err["code"]) == (status, code), (query, body_in if not isinstance(body_in, dict) else "", raw)
            assert set(err) >= {"type", "code", "message"} and headers["content-type"].startswith("application/json")
        st, _, raw = await _post(s, f"{base}/v1/db/nodb/seq", {})
        assert st == 404 and json.loads(raw)["error"]["code"] == "unknown_database"
        st, _, raw = await _post(s, f"{base}/v1/db/lite/code")  # empty body = no params
        assert st == 400 and "'c': is required" in json.loads(raw)["error"]["message"]


async def test_ndjson_stream(sqlite_path: str) -> None:
    async with running_bridge(lite(sqlite_path)) as b, serve(make_app(b)) as base, aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/db/lite/seq", json={"params": {"n": 1234}},
                          headers={"Accept": "application/x-ndjson"}) as r:
            assert r.status == 200 and r.headers["content-type"] == "application/x-ndjson"
            lines = (await r.read()).decode().splitlines()
        assert len(lines) == 1234 and json.loads(lines[0]) == {"n": 1, "pad": ""} and json.loads(lines[-1])["n"] == 1234
        async with s.post(f"{base}/v1/db/lite/capped", json={"params": {"n": 1000}, "stream": True}) as r:
            lines = (await r.read()).decode().splitlines()
        assert len(lines) == 251 and json.loads(lines[-1])["error"]["code"] == "row_cap_reached"


async def test_slow_client_backpressure_and_disconnect(sqlite_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pulled = [0]
    orig = SQLiteProfile.stream

    def counting(self: Any, conn: Any, sql: Any, params: Any, batch: int) -> Any:
        cols, it = orig(self, conn, sql, params, batch)

        def gen() -> Any:
            for rows in it:
                pulled[0] += 1
                yield rows

        return cols, gen()

    monkeypatch.setattr(SQLiteProfile, "stream", counting)
    pad = "p" * 1000
    async with running_bridge(lite(sqlite_path, stream_idle_timeout_s=30)) as b, serve(make_app(b)) as base:
        db = b.database("lite")
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=conn) as s:
            r = await s.post(f"{base}/v1/db/lite/seq", json={"params": {"n": 10**6, "pad": pad}, "stream": True},
                             read_bufsize=2**14)
            await r.content.readline()
            await asyncio.sleep(1.0)  # a slow client: the server must not read the whole result
            stalled = pulled[0]
            assert stalled < 1000, stalled  # 10,000 batches in the result; a few dozen fill the socket buffers
            await asyncio.sleep(0.5)
            assert pulled[0] - stalled < 50
            r.close()  # the client goes away mid-stream
        # the stream is abandoned: the statement is interrupted and its connection replaced
        assert await until(lambda: sum(db.live()) == 2 and db.pools[0].idle_workers() == 2, timeout=10)
        after = pulled[0]
        await asyncio.sleep(0.3)
        assert pulled[0] == after
        async with aiohttp.ClientSession() as s:
            st, _, raw = await _post(s, f"{base}/v1/db/lite/seq", {"params": {"n": 2}})
            assert st == 200 and json.loads(raw)["row_count"] == 2


async def test_postgres_over_http_with_disconnect(pg: str, tmp_path: Path) -> None:
    queries = item_queries(sleep_sql="SELECT pg_sleep(:s)::text AS slept")
    queries["big"] = {"sql": "SELECT generate_series(1, :n) AS n, repeat('x', 200) AS pad",  # streams, no tuplestore
                      "params": {"n": {"type": "int", "max": 10**8}}, "stream_max_rows": 10**8}
    cfg = {"pghttp": {"driver": "postgres", "dsn": PG_DSN, "pool_size": 2, "queries": queries}}
    async with running_bridge(cfg) as b, serve(make_app(b)) as base:
        db = b.database("pghttp")
        async with aiohttp.ClientSession() as s:
            st, _, raw = await _post(s, f"{base}/v1/db/pghttp/item", {"params": {"id": 5}})
            assert st == 200 and json.loads(raw)["rows"] == [{"id": 5, "name": "item 5", "price": "7.50"}]
            st, _, raw = await _post(s, f"{base}/v1/db/pghttp/sleep", {"params": {"s": 5}})
            assert st == 504 and json.loads(raw)["error"]["code"] == "query_timeout"
            st, _, raw = await _post(s, f"{base}/v1/db/pghttp/dup", {"params": {"id": 5}})
            assert st == 409 and json.loads(raw)["error"]["code"] == "constraint_violation"
        old = db.sessions()[0]
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=conn) as s:
            r = await s.post(f"{base}/v1/db/pghttp/big", json={"params": {"n": 10**8}},
                             headers={"Accept": "application/x-ndjson"})
            first = json.loads(await r.content.readline())
            assert first["n"] == 1
            r.close()
        # the server-side cursor's statement is cancelled and its connection closed
        assert await until(lambda: not pg_admin_query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s) AND query LIKE %s AND state <> 'idle'",
            old, "%generate_series%"), timeout=10)
        assert await until(lambda: sum(db.live()) == 2 and db.pools[0].idle_workers() == 2, timeout=10)
        async with aiohttp.ClientSession() as s:
            st, _, raw = await _post(s, f"{base}/v1/db/pghttp/item", {"params": {"id": 6}})
            assert st == 200


async def test_writes_are_audited_with_outcome(sqlite_path: str) -> None:
    events: list[Any] = []
    async with running_bridge(lite(sqlite_path)) as b, serve(make_app(b, audit_log=events)) as base, \
            aiohttp.ClientSession() as s:
        assert (await _post(s, f"{base}/v1/db/lite/mk", {}))[0] == 200
        st, _, raw = await _post(s, f"{base}/v1/db/lite/put", {"params": {"k": "secret-value"}})
        assert st == 200 and json.loads(raw) == {"database": "lite", "query": "put", "rowcount": 1}
        st, _, raw = await _post(s, f"{base}/v1/db/lite/put", {"params": {"k": "secret-value"}})
        assert st == 409
        assert (await _post(s, f"{base}/v1/db/lite/seq", {"params": {"n": 1}}))[0] == 200  # reads: not audited
    assert events[1:] == [
        ("db.execute", "query:lite/put", "ok", {"rowcount": 1}),
        ("db.execute", "query:lite/put", "error", {"code": "constraint_violation"}),
    ]
    assert "secret-value" not in repr(events)


async def test_busy_pool_is_503_with_retry_after_and_slow_query_504(sqlite_path: str) -> None:
    cfg = lite(sqlite_path, pool_size=1, pool_wait_timeout_s=0.1)
    async with running_bridge(cfg) as b, serve(make_app(b)) as base, aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(_post(s, f"{base}/v1/db/lite/slow", {}))
        await asyncio.sleep(0.2)
        st, headers, raw = await _post(s, f"{base}/v1/db/lite/seq", {"params": {"n": 1}})
        assert st == 503 and headers["Retry-After"] == "1"
        assert json.loads(raw)["error"]["code"] == "db_pool_exhausted"
        st, _, raw = await slow
        assert st == 504 and json.loads(raw)["error"]["code"] == "query_timeout"
        st, _, _ = await _post(s, f"{base}/v1/db/lite/seq", {"params": {"n": 1}})
        assert st == 200  # the interrupted connection was replaced


async def test_discovery_without_sql(sqlite_path: str) -> None:
    async with running_bridge(lite(sqlite_path)) as b, serve(make_app(b, deny={"query:lite/secret"})) as base, \
            aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/db") as r:
            body = await r.json()
        assert body["databases"][0]["name"] == "lite" and "seq" in body["databases"][0]["queries"]
        async with s.get(f"{base}/v1/db/lite/seq") as r:
            d = await r.json()
        assert r.status == 200 and d["params"]["n"]["type"] == "int" and d["params"]["n"]["max"] == 10**7
        assert d["read_only"] is True and d["max_rows"] == 50
        assert "RECURSIVE" not in json.dumps(d)  # the SQL is never shown
        async with s.get(f"{base}/v1/db/lite/secret") as r:
            assert r.status == 403
        async with s.get(f"{base}/v1/db/lite/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_query"
