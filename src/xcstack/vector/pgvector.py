"""pgvector backend: psycopg 3 async pool + the `pgvector` adapter, one table per collection.

Layout (in the configured schema):
- `xc_vector_collections(name, dimension, metric, description, m, ef_construction, created_at)`;
- `xcv_<name>(id text primary key, embedding vector(d) not null, payload jsonb not null)` with an
  HNSW index (`m`, `ef_construction` from settings); `hnsw.ef_search` is set per connection and
  changed only when a search asks for another value.

Pool: `psycopg_pool.AsyncConnectionPool`, bounded (`pool_max`, `max_waiting`), acquire timeout →
503 `vector_pool_exhausted` (or `vector_backend_unavailable` when the last health check failed);
every connection is checked when it leaves the pool, so broken ones are replaced; a health loop
pings the server and records up/down. Filters are the safe language in `filters.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from xcstack.aio import cancel_and_wait
from xcstack.vector import metrics
from xcstack.vector.filters import parse_filter, to_sql
from xcstack.vector.settings import VectorSettings
from xcstack.vector.store import (
    BackendTimeout,
    BackendUnavailable,
    CollectionExists,
    CollectionInfo,
    CollectionNotFound,
    Hit,
    InvalidVector,
    Matrix,
    Metric,
    PoolExhausted,
    Record,
)

log = logging.getLogger("xcstack.vector.pgvector")
T = TypeVar("T")

CATALOG = "xc_vector_collections"
CANCEL_TIMEOUT_S = 2.0
RECANCEL_S = 0.1  # a pipeline the server has not stopped yet gets another cancel
TABLE_PREFIX = "xcv_"
MAX_HNSW_DIM = 2000  # pgvector: HNSW on `vector` supports at most 2,000 dimensions
_OPS: dict[str, tuple[str, str]] = {
    "cosine": ("<=>", "vector_cosine_ops"),
    "l2": ("<->", "vector_l2_ops"),
    "ip": ("<#>", "vector_ip_ops"),
}


def _vec_list(v: Any) -> list[float]:
    if hasattr(v, "to_list"):
        return [float(x) for x in v.to_list()]
    return [float(x) for x in v]


def _score(metric: str, d: float) -> float:
    if metric == "cosine":
        return 1.0 - d
    if metric == "ip":
        return -d
    return d


class PgvectorStore:
    backend = "pgvector"

    def __init__(self, settings: VectorSettings) -> None:
        self.settings = settings
        self.cfg = settings.pgvector
        assert self.cfg.url is not None
        self._url = self.cfg.url.get_secret_value()
        self._schema = sql.Identifier(self.cfg.db_schema)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._ef: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], int] = weakref.WeakKeyDictionary()
        self._meta: dict[str, tuple[int, Metric]] = {}
        self._bootstrapped = False
        self._boot_lock = asyncio.Lock()
        self._healthy = False
        self._health_detail = "not checked yet"
        self._health_task: asyncio.Task[None] | None = None
        self._building: dict[str, float] = {}  # collection -> start of an index build in progress

    # ---- lifecycle ------------------------------------------------------------------------

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_autocommit(True)
        set_json_loads(_payload_loads, conn)
        ms = max(1, int(self.settings.op_timeout_s * 1000))
        await conn.execute(f"SET statement_timeout = {ms}")
        await conn.execute(f"SET hnsw.iterative_scan = {self.cfg.iterative_scan}")
        try:
            await register_vector_async(conn)
        except psycopg.ProgrammingError:
            if not self.cfg.create_extension:
                raise
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.UniqueViolation:
                pass  # another connection created it at the same moment
            await register_vector_async(conn)
        await conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(self.cfg.ef_search)))
        self._ef[conn] = self.cfg.ef_search

    async def _create_extension(self) -> None:
        """Once, before the pool opens, so pooled connections do not race to create it."""
        try:
            async with await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=max(1, int(self.settings.acquire_timeout_s + 0.999))
            ) as conn:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as exc:
            log.warning("pgvector: CREATE EXTENSION vector at start failed: %s", exc)

    async def start(self) -> None:
        s = self.settings
        if self.cfg.create_extension:
            await self._create_extension()
        self._pool = AsyncConnectionPool(
            self._url,
            min_size=self.cfg.pool_min,
            max_size=self.cfg.pool_max,
            timeout=s.acquire_timeout_s,
            max_waiting=self.cfg.pool_max * 16,
            configure=self._configure,
            check=AsyncConnectionPool.check_connection,
            # prepare_threshold None: no automatic server-side prepared statements. A search cancelled in
            # the middle of its pipeline can leave psycopg's cache naming a statement the server never kept
            # ("prepared statement _pg3_0 does not exist" on the pooled connection's next search)
            kwargs={"connect_timeout": max(1, int(s.acquire_timeout_s + 0.999)), "row_factory": tuple_row,
                    "prepare_threshold": None},
            reconnect_timeout=max(10.0, s.health_interval_s * 10),
            name="xc-vector-pgvector",
            open=False,
        )
        await self._pool.open(wait=False)
        try:
            await self._check_health()
        except Exception:  # start even when the database is down; health reports it
            log.warning("pgvector not reachable at start: %s", self._health_detail)
        self._health_task = asyncio.create_task(self._health_loop(), name="xc-vector-pg-health")

    async def close(self) -> None:
        await cancel_and_wait([self._health_task])
        if self._pool is not None:
            await self._pool.close(timeout=5.0)

    async def health(self) -> tuple[bool, str]:
        return self._healthy, self._health_detail

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self._check_health()
            except asyncio.CancelledError:
                raise
            except Exception:
                pass

    def _set_health(self, ok: bool, detail: str) -> None:
        if ok != self._healthy:
            (log.info if ok else log.warning)("pgvector %s: %s", "up" if ok else "down", detail)
        self._healthy, self._health_detail = ok, detail
        metrics.BACKEND_UP.labels(self.backend).set(1 if ok else 0)

    async def _check_health(self) -> None:
        try:
            async with self._conn(health=True) as conn:
                await conn.execute("SELECT 1")
            if not self._bootstrapped:
                await self._bootstrap()
            self._set_health(True, "ok")
        except (BackendUnavailable, PoolExhausted, BackendTimeout) as exc:
            self._set_health(False, exc.message)
            raise
        except psycopg.Error as exc:
            self._set_health(False, f"{type(exc).__name__}: {exc}".strip())
            raise

    async def _bootstrap(self) -> None:
        async with self._boot_lock:
            if self._bootstrapped:
                return
            async with self._conn() as conn:
                await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self._schema))
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.{} (name text PRIMARY KEY, dimension int NOT NULL, "
                        "metric text NOT NULL, description text NOT NULL DEFAULT '', m int NOT NULL, "
                        "ef_construction int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
                    ).format(self._schema, sql.Identifier(CATALOG))
                )
            self._bootstrapped = True

    @asynccontextmanager
    async def _conn(self, *, health: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; pool/driver failures become 503s with stable codes."""
        assert self._pool is not None, "store not started"
        t0 = time.perf_counter()
        try:
            async with self._pool.connection() as conn:
                metrics.POOL_WAIT.labels("pgvector").observe(time.perf_counter() - t0)
                if not self._healthy and not health:
                    self._set_health(True, "ok")  # a working connection: the server is back
                try:
                    yield conn
                except BaseException:
                    await _cancel_running(conn)
                    raise
        except PoolTimeout:
            metrics.POOL_EXHAUSTED.labels("pgvector").inc()
            if not self._healthy or health:
                raise BackendUnavailable(
                    f"pgvector unreachable: no connection within {self.settings.acquire_timeout_s:g}s"
                    + ("" if health else f" (last health check: {self._health_detail})")
                ) from None
            raise PoolExhausted(
                f"all {self.cfg.pool_max} pgvector connections busy for {self.settings.acquire_timeout_s:g}s"
            ) from None
        except TooManyRequests:
            metrics.POOL_EXHAUSTED.labels("pgvector").inc()
            raise PoolExhausted("too many requests waiting for a pgvector connection") from None
        except psycopg.errors.QueryCanceled as exc:
            raise BackendTimeout(f"pgvector statement cancelled: {exc}".strip()) from None
        except psycopg.OperationalError as exc:
            if self._healthy:
                self._set_health(False, f"{type(exc).__name__}: {exc}".strip())
            raise BackendUnavailable(f"pgvector connection failed: {exc}".strip()) from None

    async def _ready(self) -> None:
        if not self._bootstrapped:
            await self._bootstrap()

    def _table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self._schema, sql.Identifier(TABLE_PREFIX + name))

    async def _collection_meta(self, conn: psycopg.AsyncConnection[Any], name: str) -> tuple[int, Metric]:
        cached = self._meta.get(name)
        if cached is not None:
            return cached
        cur = await conn.execute(
            sql.SQL("SELECT dimension, metric FROM {}.{} WHERE name = %s").format(
                self._schema, sql.Identifier(CATALOG)
            ),
            (name,),
        )
        row = await cur.fetchone()
        if row is None:
            raise CollectionNotFound(name)
        meta: tuple[int, Metric] = (int(row[0]), row[1])
        self._meta[name] = meta
        return meta

    # ---- collections ----------------------------------------------------------------------

    async def create_collection(
        self, name: str, dimension: int, metric: Metric, description: str = ""
    ) -> CollectionInfo:
        if dimension > MAX_HNSW_DIM:
            raise InvalidVector(
                f"dimension {dimension}: pgvector's HNSW index supports at most {MAX_HNSW_DIM} dimensions",
                param="dimension",
            )
        await self._ready()
        opclass = _OPS[metric][1]
        table = self._table(name)
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                sql.SQL(
                    "INSERT INTO {}.{} (name, dimension, metric, description, m, ef_construction) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name"
                ).format(self._schema, sql.Identifier(CATALOG)),
                (name, dimension, metric, description, self.cfg.m, self.cfg.ef_construction),
            )
            if await cur.fetchone() is None:
                raise CollectionExists(name)
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id text PRIMARY KEY, embedding vector({}) NOT NULL, "
                    "payload jsonb NOT NULL DEFAULT '{{}}'::jsonb)"
                ).format(table, sql.Literal(dimension))
            )
            if self.cfg.index_on_create:
                await conn.execute(self._create_index_sql(name, opclass))
        self._meta[name] = (dimension, metric)
        log.info(
            "pgvector: created collection %s (dim %d, %s, hnsw m=%d efc=%d)",
            name,
            dimension,
            metric,
            self.cfg.m,
            self.cfg.ef_construction,
        )
        state = "ready" if self.cfg.index_on_create else "none"
        return CollectionInfo(name, dimension, metric, 0, description, self._index_info(state))

    def _create_index_sql(self, name: str, opclass: str) -> sql.Composed:
        return sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding {}) WITH (m = {}, ef_construction = {})").format(
            sql.Identifier(f"{TABLE_PREFIX}{name}_hnsw"),
            self._table(name),
            sql.SQL(opclass),
            sql.Literal(self.cfg.m),
            sql.Literal(self.cfg.ef_construction),
        )

    async def _index_state(self, conn: psycopg.AsyncConnection[Any], name: str) -> str:
        if name in self._building:
            return "building"
        cur = await conn.execute(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (self.cfg.db_schema, f"{TABLE_PREFIX}{name}_hnsw"),
        )
        row = await cur.fetchone()
        if row is None:
            return "none"
        return "ready" if row[0] else "invalid"

    def loading(self) -> dict[str, float]:
        now = time.monotonic()
        return {n: now - t for n, t in self._building.items()}

    def _index_info(self, state: str) -> dict[str, Any]:
        return {
            "type": "HNSW",
            "m": self.cfg.m,
            "ef_construction": self.cfg.ef_construction,
            "ef_search": self.cfg.ef_search,
            "state": state,
        }

    async def list_collections(self) -> list[str]:
        await self._ready()
        async with self._conn() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT name FROM {}.{} ORDER BY name").format(self._schema, sql.Identifier(CATALOG))
            )
            return [r[0] for r in await cur.fetchall()]

    async def describe_collection(self, name: str) -> CollectionInfo:
        await self._ready()
        async with self._conn() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT dimension, metric, description FROM {}.{} WHERE name = %s").format(
                    self._schema, sql.Identifier(CATALOG)
                ),
                (name,),
            )
            row = await cur.fetchone()
            if row is None:
                raise CollectionNotFound(name)
            count = await self._count(conn, name)
            state = await self._index_state(conn, name)
        info = self._index_info(state)
        if name in self._building:
            info["building_for_s"] = round(time.monotonic() - self._building[name], 1)
        return CollectionInfo(name, int(row[0]), row[1], count, row[2], info)

    async def drop_collection(self, name: str) -> None:
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                sql.SQL("DELETE FROM {}.{} WHERE name = %s RETURNING name").format(
                    self._schema, sql.Identifier(CATALOG)
                ),
                (name,),
            )
            if await cur.fetchone() is None:
                raise CollectionNotFound(name)
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._table(name)))
        self._meta.pop(name, None)
        log.info("pgvector: dropped collection %s", name)

    async def _count(self, conn: psycopg.AsyncConnection[Any], name: str) -> int:
        try:
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._table(name)))
        except psycopg.errors.UndefinedTable:
            raise CollectionNotFound(name) from None
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def count(self, name: str) -> int:
        await self._ready()
        async with self._conn() as conn:
            await self._collection_meta(conn, name)
            return await self._count(conn, name)

    # ---- rows -----------------------------------------------------------------------------

    async def upsert(self, name: str, ids: Sequence[str], vectors: Matrix, payloads: Sequence[dict[str, Any]]) -> int:
        await self._ready()
        t0 = time.perf_counter()
        async with self._conn() as conn:
            dim, _ = await self._collection_meta(conn, name)
            if vectors.shape[1] != dim:
                raise InvalidVector(f"vectors have dimension {vectors.shape[1]}; collection {name!r} has {dim}")
            # COPY (binary) into a per-connection staging table, then one INSERT .. ON CONFLICT: one round
            # trip per batch instead of one statement per row.
            merge = sql.SQL(
                "INSERT INTO {} (id, embedding, payload) SELECT id, embedding, payload FROM xc_vector_stage "
                "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, payload = EXCLUDED.payload"
            ).format(self._table(name))
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS xc_vector_stage (id text, embedding vector, payload jsonb) "
                        "ON COMMIT DELETE ROWS"
                    )
                    async with cur.copy(
                        "COPY xc_vector_stage (id, embedding, payload) FROM STDIN (FORMAT BINARY)"
                    ) as cp:
                        cp.set_types(["text", "vector", "jsonb"])
                        for i, v, p in zip(ids, vectors, payloads, strict=True):
                            await cp.write_row((i, v, Jsonb(p)))
                    await cur.execute(merge)
            except psycopg.errors.UndefinedTable:
                self._meta.pop(name, None)
                raise CollectionNotFound(name) from None
        metrics.OPS.labels(self.backend, "upsert", "ok").observe(time.perf_counter() - t0)
        metrics.ROWS.labels(self.backend, "upsert").inc(len(ids))
        return len(ids)

    async def delete(self, name: str, ids: Sequence[str] | None = None, filter: str | None = None) -> int | None:
        await self._ready()
        where: list[str] = []
        params: list[Any] = []
        if ids is not None:
            where.append("id = ANY(%s)")
            params.append(list(ids))
        if filter:
            f_sql, f_params = to_sql(parse_filter(filter))
            where.append(f_sql)
            params.extend(f_params)
        if not where:
            raise InvalidVector("delete needs ids or a filter", param="ids")
        async with self._conn() as conn:
            await self._collection_meta(conn, name)
            query = sql.SQL("DELETE FROM {} WHERE ").format(self._table(name)) + sql.SQL(" AND ".join(where))
            try:
                cur = await conn.execute(query, params)
            except psycopg.errors.UndefinedTable:
                self._meta.pop(name, None)
                raise CollectionNotFound(name) from None
            n = cur.rowcount
        metrics.ROWS.labels(self.backend, "delete").inc(max(0, n))
        return n

    async def search(
        self,
        name: str,
        vectors: Matrix,
        top_k: int,
        *,
        filter: str | None = None,
        output_fields: Sequence[str] | None = None,
        include_vectors: bool = False,
        ef: int | None = None,
    ) -> list[list[Hit]]:
        await self._ready()
        f_sql, f_params = "", list[Any]()
        if filter:
            f_sql, f_params = to_sql(parse_filter(filter))
        all_fields = output_fields is not None and "*" in output_fields
        fields = [] if output_fields is None or all_fields else list(output_fields)
        t0 = time.perf_counter()
        async with self._conn() as conn:
            dim, metric = await self._collection_meta(conn, name)
            if vectors.shape[1] != dim:
                raise InvalidVector(f"query vector has dimension {vectors.shape[1]}; collection {name!r} has {dim}")
            op = _OPS[metric][0]
            cols = [sql.SQL("id"), sql.SQL("embedding {} %b AS xc_distance").format(sql.SQL(op))]
            if all_fields:
                cols.append(sql.SQL("payload"))
            cols += [sql.SQL("payload -> %s") for _ in fields]
            if include_vectors:
                cols.append(sql.SQL("embedding"))
            # ORDER BY the select-list distance: the HNSW index serves it, and the vector travels once (binary)
            query = sql.SQL("SELECT {} FROM {}{} ORDER BY xc_distance LIMIT %s").format(
                sql.SQL(", ").join(cols),
                self._table(name),
                sql.SQL(" WHERE " + f_sql) if f_sql else sql.SQL(""),
            )
            want_ef = ef or self.cfg.ef_search
            if self._ef.get(conn) != want_ef:
                await conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(want_ef)))
                self._ef[conn] = want_ef
            results: list[list[Hit]] = []
            try:
                if len(vectors) == 1:
                    rows_per_query = [await self._one(conn, query, vectors[0], fields, f_params, top_k)]
                else:
                    params = [[v, *fields, *f_params, top_k] for v in vectors]
                    rows_per_query = await _stopped_on_cancel(conn, _pipelined(conn, query, params))
            except psycopg.errors.UndefinedTable:
                self._meta.pop(name, None)
                raise CollectionNotFound(name) from None
        for rows in rows_per_query:
            hits = []
            for row in rows:
                payload: dict[str, Any] | None = None
                i = 2
                if all_fields:
                    payload = row[2]
                    i = 3
                elif fields:
                    payload = {f: row[i + j] for j, f in enumerate(fields) if row[i + j] is not None}
                    i += len(fields)
                vec = _vec_list(row[i]) if include_vectors else None
                hits.append(Hit(row[0], _score(metric, float(row[1])), payload, vec))
            results.append(hits)
        metrics.OPS.labels(self.backend, "search", "ok").observe(time.perf_counter() - t0)
        return results

    async def _one(
        self,
        conn: psycopg.AsyncConnection[Any],
        query: sql.Composed,
        v: np.ndarray[Any, Any],
        fields: list[str],
        f_params: list[Any],
        top_k: int,
    ) -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, [v, *fields, *f_params, top_k])
        return await cur.fetchall()

    async def export(
        self, name: str, *, batch_size: int = 1000, filter: str | None = None, include_vectors: bool = True
    ) -> AsyncGenerator[list[Record], None]:
        """Keyset pagination by id: a connection is held only while one batch is read."""
        await self._ready()
        f_sql, f_params = "", list[Any]()
        if filter:
            f_sql, f_params = to_sql(parse_filter(filter))
        last: str | None = None
        while True:
            async with self._conn() as conn:
                await self._collection_meta(conn, name)
                conds = ([f_sql] if f_sql else []) + (["id > %s"] if last is not None else [])
                query = sql.SQL("SELECT id, payload{} FROM {}{} ORDER BY id LIMIT %s").format(
                    sql.SQL(", embedding") if include_vectors else sql.SQL(""),
                    self._table(name),
                    sql.SQL(" WHERE " + " AND ".join(conds)) if conds else sql.SQL(""),
                )
                params = [*f_params, *([last] if last is not None else []), batch_size]
                try:
                    cur = await conn.execute(query, params)
                except psycopg.errors.UndefinedTable:
                    raise CollectionNotFound(name) from None
                rows = await cur.fetchall()
            if not rows:
                return
            yield [Record(r[0], r[1], _vec_list(r[2]) if include_vectors else None) for r in rows]
            last = rows[-1][0]
            if len(rows) < batch_size:
                return

    async def build_index(self, name: str) -> CollectionInfo:
        """Build the HNSW index now: CREATE INDEX when there is none (bulk-load first with
        `index_on_create = false`), else REINDEX (e.g. after large deletes). Progress in the log and /readyz."""
        await self._ready()
        if name in self._building:
            raise BackendUnavailable(f"an index build of {name!r} is already running; retry later")
        t0 = time.perf_counter()
        async with self._conn() as conn:
            _, metric = await self._collection_meta(conn, name)
            state = await self._index_state(conn, name)
            self._building[name] = time.monotonic()
            log.info("pgvector: %s the HNSW index of %s", "building" if state == "none" else "rebuilding", name)

            async def progress() -> None:
                while True:
                    await asyncio.sleep(5)
                    log.info("pgvector: still indexing %s (%.0fs)", name, time.perf_counter() - t0)

            ticker = asyncio.create_task(progress())
            try:
                await conn.execute("SET statement_timeout = 0")
                if state == "none":
                    await conn.execute(self._create_index_sql(name, _OPS[metric][1]))
                else:
                    await conn.execute(
                        sql.SQL("REINDEX INDEX {}.{}").format(
                            self._schema, sql.Identifier(f"{TABLE_PREFIX}{name}_hnsw")
                        )
                    )
            finally:
                ticker.cancel()
                self._building.pop(name, None)
                await conn.execute(f"SET statement_timeout = {max(1, int(self.settings.op_timeout_s * 1000))}")
        dt = time.perf_counter() - t0
        metrics.INDEX_BUILD.labels(self.backend).observe(dt)
        log.info("pgvector: index of %s ready in %.1fs", name, dt)
        return await self.describe_collection(name)


async def _pipelined(
    conn: psycopg.AsyncConnection[Any], query: sql.Composed, params: list[list[Any]]
) -> list[list[tuple[Any, ...]]]:
    """Many statements in one round trip (one implicit transaction: an error aborts the rest)."""
    async with conn.pipeline():
        curs = []
        for p in params:
            cur = conn.cursor()
            await cur.execute(query, p)
            curs.append(cur)
    return [await c.fetchall() for c in curs]


async def _stopped_on_cancel(conn: psycopg.AsyncConnection[Any], work: Coroutine[Any, Any, T]) -> T:
    """Run multi-statement `work` on `conn`; if the caller goes away, cancel on the server until
    the work has stopped. PostgreSQL drops a cancel request that lands between two statements (a
    cancel held off while parallel workers shut down is discarded when the backend reads the next
    message: 1 pipeline in 3 here ran on), and psycopg's own cancel then waits 5 s and closes the
    connection. The work runs in its own task so that the connection is not handed back while it
    is still in use."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await _cancel_until_stopped(conn, task)
        raise


async def _cancel_until_stopped(conn: psycopg.AsyncConnection[Any], task: asyncio.Future[Any]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_TIMEOUT_S
    try:
        while not task.done() and loop.time() < deadline:
            with contextlib.suppress(Exception):
                await conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)
            await asyncio.wait([task], timeout=RECANCEL_S)
    finally:
        if not task.done():  # the server did not stop it: psycopg's own path closes the connection
            await cancel_and_wait([task])
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the caller's cancellation is what propagates


async def _cancel_running(conn: psycopg.AsyncConnection[Any]) -> None:
    """Cancel what the server still runs for a caller that failed or went away, before the pool
    gets the connection back. psycopg cancels on its own only while it waits for results; a
    caller cancelled while a pipeline is still being sent (500 searches: the socket buffer is full)
    left the server working through every query already buffered (seconds), and the pool's close
    did not stop it. Without a Sync, the cancelled statement aborts the rest of the pipeline."""
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
        return
    with contextlib.suppress(Exception):
        await asyncio.shield(conn.cancel_safe(timeout=CANCEL_TIMEOUT_S))


def _wide_int(text: str) -> int | float:
    """jsonb keeps 1e20 as the integer 100000000000000000000; answers are JSON numbers of at most 64 bits,
    so an integer wider than that comes back as the float it was sent as (it was a 500 when encoded)."""
    value = int(text)
    return value if -(2**63) <= value < 2**63 else float(value)


def _payload_loads(data: str | bytes) -> Any:
    return json.loads(data, parse_int=_wide_int)
