"""HTTP adapter: `POST /v1/db/{database}/{query}` runs a named query (JSON rows or NDJSON stream)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from xcstack.apidoc import api
from xcstack.db import errors as dberr
from xcstack.db.bridge import Bridge
from xcstack.db.database import QueryResult, RowStream
from xcstack.db.profiles import Row
from xcstack.db.protocol import (
    NDJSON,
    DatabaseList,
    DbCode,
    QueryContract,
    QueryRequest,
    QueryResponse,
    dumps,
    unique_columns,
)
from xcstack.disconnect import wait_disconnect
from xcstack.errors import BadRequest, CoreCode, XCError
from xcstack.httputil import content_length, ensure_size, loads, parse_model
from xcstack.security.guard import audit, authorize, requires


def rows_as_objects(columns: list[str], rows: list[Row]) -> list[dict[str, Any]]:
    return [dict(zip(columns, r, strict=False)) for r in rows]


def result_body(database: str, query: str, result: QueryResult) -> dict[str, Any]:
    """The JSON answer of a run query (here, not in protocol.py, which imports nothing that raises)."""
    if result.columns is None:
        return {"database": database, "query": query, "rowcount": result.rowcount}
    cols = unique_columns(result.columns)
    return {
        "database": database,
        "query": query,
        "columns": cols,
        "rows": rows_as_objects(cols, result.rows),
        "row_count": len(result.rows),
        "truncated": result.truncated,
    }


class NDJSONRowResponse(Response):
    """Streams rows as NDJSON. Each batch is written with `await send()`, which waits for a slow
    client; the next batch is fetched from the database only after that (end-to-end backpressure).
    A client that disconnects stops the stream (checked per batch), which cancels the statement."""

    media_type = NDJSON

    def __init__(self, stream: RowStream) -> None:
        # No Response.__init__: it would add `content-length: 0` for an empty initial body.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", NDJSON.encode()),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self.stream = stream
        self.columns = unique_columns(stream.columns)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            await wait_disconnect(receive)
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        stream = self.stream
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            try:
                async for rows in stream:
                    if gone.is_set():
                        return
                    chunk = b"".join([dumps(r) + b"\n" for r in rows_as_objects(self.columns, rows)])
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if gone.is_set():
                        return
                tail = b""
                if stream.truncated:
                    tail = dumps({"error": {"type": "invalid_request_error", "code": DbCode.ROW_CAP_REACHED,
                                            "message": f"stream stopped at the query's cap of {stream.sent} rows"}})
                    tail += b"\n"
            except XCError as exc:
                tail = dumps(exc.body()) + b"\n"  # headers are gone: the error is the last line
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            return  # the client went away mid-write
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await stream.aclose()


_STREAM = ("one JSON object per row and line; an error after the first row, or the query's `stream_max_rows`, "
           "ends the stream with a last line `{\"error\": {type, code, message}}` (`row_cap_reached`, ...)")


def build_routes(bridge: Bridge, max_body_bytes: int) -> list[BaseRoute]:
    async def _authorized_query(request: Request) -> tuple[str, str, Any, Any]:
        """The named query of the path (404 for an unknown database or query), once the caller may run it."""
        database = request.path_params["database"]
        name = request.path_params["query"]
        db = bridge.databases.get(database)
        if db is None:
            raise dberr.unknown_database(database)
        q = db.queries.get(name)
        if q is None:
            raise dberr.unknown_query(database, name)
        await authorize(request, q.permission, "execute")
        return database, name, db, q

    @api("Run a named query: JSON rows, or an NDJSON stream", body=QueryRequest, body_required=False,
         response=QueryResponse, streams={NDJSON: _STREAM}, errors=(404, 409, 500, 504),
         checks="Also `execute` on the query's permission (default `query:<database>/<query>`).",
         description="An empty body means no parameters. Streaming (`\"stream\": true` or `Accept: "
                     "application/x-ndjson`) is for read-only queries only (400 `not_streamable`).")
    @requires("db", "query")
    async def run_query(request: Request) -> Response:
        database, name, db, q = await _authorized_query(request)
        size = content_length(request)
        if size is not None:
            ensure_size(size, max_body_bytes)
        raw = await request.body()
        ensure_size(len(raw), max_body_bytes)
        data: Any = {}
        if raw.strip():
            try:
                data = loads(raw)
            except ValueError as exc:
                raise BadRequest(f"malformed JSON: {exc}", code=CoreCode.INVALID_JSON) from None
        body = parse_model(data, QueryRequest)
        stream = body.stream or NDJSON in request.headers.get("accept", "")
        if stream:
            rs = await db.stream(name, body.params)
            return NDJSONRowResponse(rs)
        if q.read_only:
            result = await db.query(name, body.params)
        else:  # writes are audited with their outcome (never with parameter values)
            resource = f"query:{database}/{name}"
            try:
                result = await db.query(name, body.params)
            except XCError as exc:
                await audit(request, "db.execute", resource, "error", {"code": exc.code})
                raise
            await audit(request, "db.execute", resource, "ok", {"rowcount": result.rowcount})
        return Response(dumps(result_body(database, name, result)), media_type="application/json")

    @api("The databases and their named queries", response=DatabaseList)
    @requires("db", "query")
    async def list_queries(request: Request) -> Response:
        body = {"databases": [
            {"name": name, "driver": db.cfg.driver, "shards": len(db.pools), "queries": sorted(db.queries)}
            for name, db in bridge.databases.items()
        ]}
        return Response(dumps(body), media_type="application/json")

    @api("A named query's contract: parameters, limits, read-only (never its SQL)", response=QueryContract,
         errors=(404,), checks="Also `execute` on the query's permission (the right to run it).")
    @requires("db", "query")
    async def describe_query(request: Request) -> Response:
        """A query's contract (parameters, limits), never its SQL; needs the right to run it."""
        database, name, _db, q = await _authorized_query(request)
        params = {
            p: spec.model_dump(exclude_none=True, exclude_defaults=False) for p, (spec, _) in q.checkers.items()
        }
        body = {
            "database": database, "query": name, "description": q.settings.description, "params": params,
            "read_only": q.read_only, "max_rows": q.max_rows, "stream_max_rows": q.stream_max_rows,
            "timeout_s": q.timeout_s, "transaction": len(q.statements) > 1, "shard_key": q.shard_key,
        }
        return Response(dumps(body), media_type="application/json")

    return [
        Route("/v1/db", list_queries, methods=["GET"], name="db_list"),
        Route("/v1/db/{database}/{query}", run_query, methods=["POST"], name="db_query"),
        Route("/v1/db/{database}/{query}", describe_query, methods=["GET"], name="db_describe"),
    ]
