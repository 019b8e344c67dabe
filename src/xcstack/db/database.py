"""One configured database: named queries routed to its shards, fan-out, row streams and transactions.

Each of them becomes jobs on a shard's pool (`db/pool.py`); the job bodies below are the only code
here that runs in a worker thread. Driver errors come back as `JobFailure` and are mapped to the
HTTP errors of `db/errors.py` here, with the query's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xcstack.config import ConfigError
from xcstack.db import errors as dberr
from xcstack.db import metrics as m
from xcstack.db.pool import ABANDONED, RUNNING, Job, JobFailure, Pool, StreamState, TransactionClosed, Worker
from xcstack.db.profiles import DriverProfile, ErrorKind, Row, get_profile
from xcstack.db.protocol import DbCode
from xcstack.db.queries import NamedQuery
from xcstack.db.settings import DatabaseSettings
from xcstack.db.sqlparams import CompiledSQL
from xcstack.errors import BadRequest, GatewayTimeout, XCError
from xcstack.security.secrets import SecretStore, has_refs, resolve_dsn

log = logging.getLogger("xcstack.db")


@dataclass
class QueryResult:
    columns: list[str] | None  # None: the statement returned no result set (DML)
    rows: list[Row]
    rowcount: int
    truncated: bool = False


# --- job bodies (run in the worker thread) --------------------------------------------------------
def _query_op(sql: CompiledSQL, params: dict[str, Any], max_rows: int) -> Callable[[DriverProfile, Any], Any]:
    def op(profile: DriverProfile, conn: Any) -> QueryResult:
        cols, rows, count = profile.execute(conn, sql, params, max_rows)
        truncated = len(rows) > max_rows
        if truncated:
            del rows[max_rows:]
        return QueryResult(cols, rows, count if cols is None else len(rows), truncated)

    return op


def _transaction_op(
    statements: Sequence[CompiledSQL], params: dict[str, Any], max_rows: int
) -> Callable[[DriverProfile, Any], Any]:
    def op(profile: DriverProfile, conn: Any) -> QueryResult:
        profile.begin(conn)
        try:
            result = QueryResult(None, [], 0)
            total = 0
            for sql in statements:
                cols, rows, count = profile.execute(conn, sql, params, max_rows)
                if cols is None:
                    total += max(count, 0)
                    result = QueryResult(None, [], total)
                else:
                    truncated = len(rows) > max_rows
                    result = QueryResult(cols, rows[:max_rows], min(len(rows), max_rows), truncated)
            profile.commit(conn)
            return result
        except BaseException:
            with contextlib.suppress(Exception):
                profile.rollback(conn)
            raise

    return op


class Database:
    """One configured database: its named queries and one pool per shard."""

    def __init__(self, name: str, cfg: DatabaseSettings, canceller: ThreadPoolExecutor) -> None:
        self.name = name
        self.cfg = cfg
        self.profile = get_profile(cfg.driver)
        self.queries: dict[str, NamedQuery] = {
            qn: NamedQuery.build(name, qn, q, self.profile, cfg.query_timeout_s) for qn, q in cfg.queries.items()
        }
        longest = max([cfg.query_timeout_s, *(q.timeout_s for q in self.queries.values())])
        io_timeout = longest + cfg.connect_timeout_s + 10
        self.pools = [
            Pool(name, i, dsn, cfg, self.profile, io_timeout, canceller) for i, dsn in enumerate(cfg.shard_dsns())
        ]
        self._qm: dict[tuple[str, str], Any] = {}
        self._hist = m.QUERY_SECONDS.labels(name)
        pools = self.pools
        with contextlib.suppress(Exception):  # set_function is unavailable in multiprocess mode
            m.POOL_UP.labels(name).set_function(lambda: sum(p.live for p in pools))
            m.POOL_BUSY.labels(name).set_function(
                lambda: sum(1 for p in pools for w in p.workers if w.busy or w.pin_owner is not None)
            )

    # --- life ----------------------------------------------------------------------------------
    async def resolve(self, secrets: SecretStore | None) -> None:
        """Replace `secret:NAME` / `{secret:NAME}` in the DSNs with the stored values (read again at
        every start; the settings keep the references). ConfigError naming the key when one fails."""
        for p, dsn in zip(self.pools, self.cfg.shard_dsns(), strict=True):
            if has_refs(dsn):
                p.dsn, p.redactions = await resolve_dsn(secrets, dsn, p.config_key)
                p.unresolved = False
                log.info("%s: secret references resolved", p.config_key)

    async def start(self, wait: float = 5.0) -> None:
        for p in self.pools:
            if p.unresolved:
                raise ConfigError(f"{p.config_key}: secret references were not resolved (start the bridge with "
                                  "the security capability's secret store: Bridge.start(secrets=...))")
        self.profile.mod  # noqa: B018 -- import the driver now: a missing one fails start-up, not a request
        for p in self.pools:
            p.start()
        await asyncio.gather(*(p.wait_first_round(wait) for p in self.pools))

    async def stop(self, timeout: float = 5.0) -> None:
        await asyncio.gather(*(p.stop(timeout) for p in self.pools))

    def live(self) -> list[int]:
        return [p.live for p in self.pools]

    def sessions(self) -> list[list[Any]]:
        """Server session ids per shard (backend pid, thread id): for operators and tests."""
        return [[w.session for w in p.workers if w.conn is not None] for p in self.pools]

    # --- routing -------------------------------------------------------------------------------
    def query_named(self, name: str) -> NamedQuery:
        q = self.queries.get(name)
        if q is None:
            raise dberr.unknown_query(self.name, name)
        return q

    def shard_for(self, value: Any) -> Pool:
        n = len(self.pools)
        if n == 1:
            return self.pools[0]
        key = value if isinstance(value, bytes) else str(value).encode()
        return self.pools[zlib.crc32(key) % n]

    def _pool_for(self, q: NamedQuery, params: dict[str, Any]) -> Pool:
        if len(self.pools) == 1:
            return self.pools[0]
        assert q.shard_key is not None  # settings require it on sharded databases
        return self.shard_for(params[q.shard_key])

    # --- queries -------------------------------------------------------------------------------
    async def query(self, name: str, params: Any = None, *, timeout: float | None = None) -> QueryResult:
        """Run a named query; parameters are validated (400), errors mapped (503/504/409/500)."""
        q = self.query_named(name)
        values = q.validate(params)
        return await self._run_named(q, values, timeout)

    async def _run_named(self, q: NamedQuery, values: dict[str, Any], timeout: float | None) -> QueryResult:
        if q.settings.fan_out and len(self.pools) > 1:
            return await self._fan_out(q, values, timeout)
        pool = self._pool_for(q, values)
        t = timeout or q.timeout_s
        if len(q.statements) == 1:
            op = _query_op(q.statements[0], values, q.max_rows)
        else:
            op = _transaction_op(q.statements, values, q.max_rows)
        t0 = time.perf_counter()
        outcome = "error"
        try:
            job = Job(op, retriable=q.read_only)
            try:
                result: QueryResult = await pool.run(job, t, lambda: dberr.query_timeout(self.name, q.name, t))
            except JobFailure as f:
                raise dberr.from_driver(f.kind, self.name, q.name, f.exc or ConnectionError("lost")) from None
            outcome = "ok"
            return result
        except XCError as exc:
            outcome = exc.code
            raise
        finally:
            self._count(q.name, outcome)
            self._hist.observe(time.perf_counter() - t0)

    async def _fan_out(self, q: NamedQuery, values: dict[str, Any], timeout: float | None) -> QueryResult:
        """Every shard at once; rows concatenated in shard order up to max_rows. One failing shard
        fails the query (a partial answer would look complete)."""
        t = timeout or q.timeout_s
        t0 = time.perf_counter()
        outcome = "error"
        tasks = [
            asyncio.ensure_future(
                pool.run(Job(_query_op(q.statements[0], values, q.max_rows), retriable=True), t,
                         lambda: dberr.query_timeout(self.name, q.name, t))
            )
            for pool in self.pools
        ]
        try:
            results: list[QueryResult] = await asyncio.gather(*tasks)
            rows: list[Row] = []
            truncated = False
            for r in results:
                rows.extend(r.rows)
                truncated = truncated or r.truncated
            if len(rows) > q.max_rows:
                del rows[q.max_rows:]
                truncated = True
            outcome = "ok"
            return QueryResult(results[0].columns, rows, len(rows), truncated)
        except JobFailure as f:
            raise dberr.from_driver(f.kind, self.name, q.name, f.exc or ConnectionError("lost")) from None
        except XCError as exc:
            outcome = exc.code
            raise
        finally:
            for task in tasks:
                if task.done():
                    if not task.cancelled():
                        task.exception()  # retrieved: a second failing shard is not "never retrieved"
                else:
                    task.cancel()  # the other shards' statements are abandoned (cancelled server-side)
            self._count(q.name, outcome)
            self._hist.observe(time.perf_counter() - t0)

    def _count(self, query: str, outcome: str) -> None:
        key = (query, outcome)
        c = self._qm.get(key)
        if c is None:
            c = self._qm[key] = m.QUERIES.labels(self.name, query, outcome)
        c.inc()

    async def stream(self, name: str, params: Any = None, *, timeout: float | None = None) -> RowStream:
        """Run a named query and stream its rows in batches: the next batch is fetched from the
        server only when the consumer asks for it (backpressure). Closing the stream early cancels
        the statement and discards the connection. Errors before the first row raise here."""
        q = self.query_named(name)
        if len(q.statements) != 1 or not q.read_only:
            raise BadRequest(f"query {self.name}/{name} writes; only read-only queries stream",
                             code=DbCode.NOT_STREAMABLE)
        if q.settings.fan_out and len(self.pools) > 1:
            raise BadRequest(f"query {self.name}/{name} fans out over shards; it cannot stream",
                             code=DbCode.NOT_STREAMABLE)
        values = q.validate(params)
        pool = self._pool_for(q, values)
        t = timeout or q.timeout_s
        sql = q.statements[0]
        batch_rows = self.cfg.stream_batch_rows

        def op(profile: DriverProfile, conn: Any) -> StreamState:
            cols, batches = profile.stream(conn, sql, values, batch_rows)
            return StreamState(cols, batches)

        job = Job(op, retriable=False)
        job.stream_credits = queue.SimpleQueue()
        stream = RowStream(self, q, pool, job, t)
        try:
            cols, _ = await pool.run(job, t, stream._timeout_error)
        except JobFailure as f:
            self._count(q.name, "error")
            raise dberr.from_driver(f.kind, self.name, q.name, f.exc or ConnectionError("lost")) from None
        except XCError as exc:
            self._count(q.name, exc.code)
            raise
        stream.columns = cols
        return stream

    def transaction(self, shard_key: Any = None, *, timeout: float | None = None) -> Transaction:
        """`async with db.transaction() as tx: await tx.query(...)`: named queries on one connection."""
        if len(self.pools) > 1 and shard_key is None:
            raise BadRequest(f"database {self.name!r} is sharded: a transaction needs a shard key",
                             code=DbCode.SHARD_KEY)
        pool = self.shard_for(shard_key) if len(self.pools) > 1 else self.pools[0]
        return Transaction(self, pool, timeout or self.cfg.query_timeout_s)


class RowStream:
    """Row batches of a streaming query: `async for rows in stream`; `await stream.aclose()` early."""

    def __init__(self, db: Database, q: NamedQuery, pool: Pool, job: Job, timeout: float) -> None:
        self.db = db
        self.query = q
        self.pool = pool
        self.job = job
        self.timeout = timeout
        self.columns: list[str] = []
        self.sent = 0
        self.finished = False  # every row was read
        self.truncated = False  # stopped at the query's stream_max_rows
        self.closed = False

    def _timeout_error(self) -> XCError:
        return dberr.query_timeout(self.db.name, self.query.name, self.timeout)

    def __aiter__(self) -> RowStream:
        return self

    async def __anext__(self) -> list[Row]:
        if self.closed or self.finished:
            raise StopAsyncIteration
        cap = self.query.stream_max_rows
        if self.sent >= cap:
            self.truncated = True
            await self.aclose()
            raise StopAsyncIteration
        pool, job = self.pool, self.job
        if job.state != RUNNING:  # the worker gave up on a consumer idle past stream_idle_timeout_s
            await self.aclose()
            raise GatewayTimeout(
                f"stream {self.db.name}/{self.query.name} was idle longer than "
                f"{self.db.cfg.stream_idle_timeout_s:g}s and was closed", code=DbCode.STREAM_IDLE_TIMEOUT)
        loop = pool.loop
        assert loop is not None and job.stream_credits is not None
        fut: asyncio.Future[Any] = loop.create_future()
        job.fut = fut
        job.stream_credits.put(True)
        handle = loop.call_later(self.timeout, pool.expire, job, self._timeout_error)
        try:
            _, rows = await fut
        except JobFailure as f:
            await self.aclose()
            raise dberr.from_driver(f.kind, self.db.name, self.query.name, f.exc or ConnectionError("lost")) from None
        except BaseException:
            await self.aclose()
            raise
        finally:
            handle.cancel()
        if rows is None:
            self.finished = True
            await self.aclose()
            raise StopAsyncIteration
        if self.sent + len(rows) > cap:
            rows = rows[: cap - self.sent]
        self.sent += len(rows)
        return list(rows)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.finished and not self.job.abandoned:
            self.pool.abandon(self.job)  # early close / cap reached / consumer gone
        self.db._count(self.query.name, "ok" if self.finished or self.truncated else "stream_aborted")


class Transaction:
    """A named transaction: several named queries on one pinned connection, committed together."""

    def __init__(self, db: Database, pool: Pool, timeout: float) -> None:
        self.db = db
        self.pool = pool
        self.timeout = timeout
        self.worker: Worker | None = None
        self.broken = False
        self.done = False

    async def __aenter__(self) -> Transaction:
        job = Job(lambda p, c: p.begin(c), retriable=False, pin=True, tx=self)
        await self._run(job, "begin")
        self.worker = job.worker
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        if self.broken and et is None:  # never let a block end as if it had committed
            raise dberr.DbError("the transaction was not committed: it failed earlier", code=DbCode.TRANSACTION_CLOSED)
        if self.broken or self.done or self.worker is None:
            return
        self.done = True
        if et is None:
            await self._run(Job(lambda p, c: p.commit(c), retriable=False, unpin=True), "commit", self.worker)
        else:
            with contextlib.suppress(Exception):
                await self._run(Job(lambda p, c: p.rollback(c), retriable=False, unpin=True), "rollback",
                                self.worker)

    async def query(self, name: str, params: Any = None) -> QueryResult:
        w = self.worker
        if self.broken or self.done or w is None or w.pin_owner is not self:
            self.broken = self.broken or not self.done
            raise dberr.DbError("the transaction is over (failed, committed or rolled back)",
                                code=DbCode.TRANSACTION_CLOSED)
        q = self.db.query_named(name)
        values = q.validate(params)
        pools = self.db.pools
        if len(pools) > 1 and q.shard_key is not None and self.db.shard_for(values[q.shard_key]) is not self.pool:
            raise BadRequest(f"query {name}: its shard key routes to another shard than this transaction's",
                             code=DbCode.SHARD_MISMATCH)
        if len(q.statements) != 1:
            raise BadRequest(f"query {name} is itself a transaction", code=DbCode.NESTED_TRANSACTION)
        job = Job(_query_op(q.statements[0], values, q.max_rows), retriable=False)
        result: QueryResult = await self._run(job, q.name, w)
        return result

    async def _run(self, job: Job, what: str, target: Worker | None = None) -> Any:
        job.tx = self
        try:
            return await self.pool.run(
                job, self.timeout, lambda: dberr.query_timeout(self.db.name, what, self.timeout), target
            )
        except JobFailure as f:
            if isinstance(f.exc, TransactionClosed):
                self.broken = True
                raise dberr.DbError("the transaction is over (idle too long or its connection was replaced)",
                                    code=DbCode.TRANSACTION_CLOSED) from None
            if f.kind is ErrorKind.CONNECTION_LOST:
                self.broken = True  # the worker unpinned itself and is reconnecting
            raise dberr.from_driver(f.kind, self.db.name, what, f.exc or ConnectionError("lost")) from None
        except BaseException:
            if job.state == ABANDONED:
                self.broken = True  # timed out / cancelled: the worker recycles its connection
            raise
