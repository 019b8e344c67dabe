"""The async facade over blocking DB-API drivers.

Per configured database (per shard), a bounded pool of dedicated worker threads; each thread owns
exactly one connection for its whole life (connection affinity: a connection never crosses
threads). The event loop never calls the driver. A call goes:

    job into the shard's queue (bounded: full -> 503) -> the next free worker takes it, runs it
    in its own thread, and takes the next job at once -> the result is handed back to the loop
    with one batched wake-up (many results, one `call_soon_threadsafe`).

A job not started within `pool_wait_timeout_s` is withdrawn (503 + Retry-After). A job's state
(queued / running / done / abandoned) changes under its own lock, so "withdrawn", "timed out" and
"finished" can never both happen. Timeouts: a timer on the loop marks a running job abandoned,
answers 504 at once and sends the profile's server-side cancel (psycopg cancel, `KILL QUERY` from
a side connection, ...) from a canceller thread; the worker then discards that connection and opens
a fresh one: a connection that was cancelled, lost, or abandoned by its caller is never reused.
Lost connections are replaced with exponential backoff; while no connection is live, callers get
503 `db_unavailable` at once. Transactions pin one worker (and so one connection) until they end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xcstack.config import ConfigError
from xcstack.db import errors as dberr
from xcstack.db import metrics as m
from xcstack.db.profiles import DriverProfile, ErrorKind, Row, get_profile
from xcstack.db.queries import NamedQuery
from xcstack.db.settings import DatabaseSettings, DbSettings
from xcstack.db.sqlparams import CompiledSQL
from xcstack.errors import BadRequest, GatewayTimeout, XCError
from xcstack.security.secrets import SecretStore, dsn_redactions, has_refs, redact, resolve_dsn

log = logging.getLogger("xcstack.db")


@dataclass
class QueryResult:
    columns: list[str] | None  # None: the statement returned no result set (DML)
    rows: list[Row]
    rowcount: int
    truncated: bool = False


class _Completions:
    """Worker threads hand results to the loop here: one `call_soon_threadsafe` per burst."""

    __slots__ = ("items", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self.scheduled = False

    def push(self, fn: Callable[..., None], *args: Any) -> None:  # any thread
        self.items.append((fn, args))
        if not self.scheduled:
            self.scheduled = True
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # loop thread
        self.scheduled = False
        items = self.items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception:  # one bad callback must not strand the others
                log.exception("db bridge: completion callback failed")


QUEUED, RUNNING, DONE, WITHDRAWN, ABANDONED = range(5)


class _Job:
    """One unit of work. `op(profile, conn)` runs in a worker thread."""

    __slots__ = ("fut", "handle", "lock", "op", "pin", "retriable", "started", "state", "stream_credits", "tx",
                 "unpin", "worker")

    def __init__(
        self, op: Callable[[DriverProfile, Any], Any], *, retriable: bool, pin: bool = False, unpin: bool = False,
        tx: Any = None,
    ) -> None:
        self.op = op
        self.retriable = retriable
        self.pin = pin  # a transaction's first job: its worker serves only this transaction until unpin
        self.unpin = unpin
        self.tx = tx
        self.lock = threading.Lock()
        self.state = QUEUED
        self.started = 0.0
        self.fut: asyncio.Future[Any] | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.worker: _Worker | None = None
        self.stream_credits: queue.SimpleQueue[bool] | None = None

    def try_start(self, worker: _Worker) -> bool:  # worker thread
        with self.lock:
            if self.state != QUEUED:
                return False
            self.state = RUNNING
            self.worker = worker
            self.started = time.monotonic()
            return True

    def try_withdraw(self) -> bool:  # loop thread: True if it had not started
        with self.lock:
            if self.state == QUEUED:
                self.state = WITHDRAWN
                return True
            return False

    def try_finish(self) -> bool:  # worker thread: False if the caller abandoned it meanwhile
        with self.lock:
            if self.state == RUNNING:
                self.state = DONE
                return True
            return False

    @property
    def abandoned(self) -> bool:
        return self.state == ABANDONED


_STOP = object()


class _Worker(threading.Thread):
    """One thread, one connection, for life."""

    def __init__(self, pool: _Pool, index: int) -> None:
        super().__init__(name=f"xc-db-{pool.label}-{index}", daemon=True)
        self.pool = pool
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # a pinning transaction's jobs
        self.conn: Any = None
        self.session: Any = None
        self.conn_lock = threading.Lock()  # close vs. a cancel in flight from the canceller thread
        self.connected = False  # loop-side view: counted in pool.live
        self.busy = False
        self.pin_owner: Any = None
        self.announce = False

    # --- thread side ------------------------------------------------------------------------
    def run(self) -> None:
        pool = self.pool
        _lower_thread_priority(pool.cfg.worker_nice)
        self._connect_loop()
        while not pool.stopping.is_set():
            item = self._next()
            if item is None:
                continue
            if item is _STOP:
                break
            if self.conn is None:  # cannot happen between jobs; never run a job without a connection
                pool.completions.push(pool._deliver, item, False, (ErrorKind.CONNECTION_LOST, None))
                self._connect_loop()
                continue
            self._run_job(item)
        self._drop()

    def _next(self) -> Any:
        """The next job: a pinning transaction's, else a queued one, else wait as idle (LIFO, so a
        lightly loaded pool keeps reusing its hottest thread). None: nothing to run this turn."""
        pool = self.pool
        if self.pin_owner is not None:
            try:
                return self.inbox.get(timeout=pool.tx_idle_timeout)
            except queue.Empty:  # a transaction left its connection idle too long
                log.warning("db %s: transaction idle for %ss; rolled back", pool.label, pool.tx_idle_timeout)
                self.pin_owner = None
                self._recycle()
                return None
        job = None
        with pool.lock:
            waiting = pool.waiting
            while waiting:
                job = waiting.popleft()
                if job.state == QUEUED:
                    break
                job = None
            if job is None:
                pool.idle.append(self)
        if self.announce:  # only now, ready to take work, is a new connection counted as live
            self.announce = False
            pool.completions.push(pool._on_ready, self)
        if job is not None:
            return job
        try:
            return self.inbox.get(timeout=pool.cfg.health_interval_s or None)
        except queue.Empty:
            with pool.lock:
                try:
                    pool.idle.remove(self)
                    pinging = True
                except ValueError:
                    pinging = False  # a job is on its way to the inbox
            if not pinging:
                return self.inbox.get()
            self._ping()
            return None

    def _ping(self) -> None:
        try:
            self.pool.profile.ping(self.conn)
        except Exception as exc:
            log.info("db %s: health check failed (%s); reconnecting", self.pool.label, self.pool.why(exc))
            self._recycle()

    def _connect_once(self) -> bool:
        pool = self.pool
        try:
            conn = pool.profile.connect(
                pool.dsn, connect_timeout=pool.cfg.connect_timeout_s, app_name=pool.app_name,
                io_timeout=pool.io_timeout,
            )
        except Exception as exc:
            log.warning("db %s: connect failed: %s", pool.label, pool.why(exc))
            return False
        try:
            pool.profile.after_connect(conn, prepare_statements=pool.cfg.prepare_statements)
            session = pool.profile.session_id(conn)
        except Exception as exc:
            log.warning("db %s: connection set-up failed: %s", pool.label, pool.why(exc))
            pool.profile.close(conn)
            return False
        self.conn, self.session = conn, session
        return True

    def _connect_loop(self) -> None:
        """Connect with exponential backoff until connected or stopping; then announce readiness."""
        pool = self.pool
        delay = pool.cfg.reconnect_backoff_initial_s
        while not pool.stopping.is_set():
            if self._connect_once():
                self.announce = True  # _next() tells the loop once this worker takes work
                return
            pool.completions.push(pool._on_connect_failed, self)
            if pool.stopping.wait(delay):
                return
            delay = min(delay * 2, pool.cfg.reconnect_backoff_max_s)

    def _drop(self) -> None:
        if self.conn is not None:
            with self.conn_lock:  # waits for a cancel that is using this connection
                self.pool.profile.close(self.conn)
                self.conn = None
                self.session = None
            self.pool.completions.push(self.pool._on_dropped, self)

    def _recycle(self) -> None:
        self._drop()
        self._connect_loop()

    def _run_job(self, job: _Job) -> None:
        if not job.try_start(self):
            return  # withdrawn while queued: its caller already has an answer
        if job.tx is not None and not job.pin and self.pin_owner is not job.tx:
            # the transaction was ended here (idle too long, connection replaced): never run its
            # statements outside it, in autocommit
            if job.try_finish():
                self.pool.completions.push(self.pool._deliver, job, False, (ErrorKind.OTHER, TransactionClosed()))
            return
        if job.pin:
            self.pin_owner = job.tx
        self.busy = True
        ok = False
        try:
            ok = self._execute(job)
        finally:
            self.busy = False
            if job.unpin or (job.pin and not ok):
                self.pin_owner = None

    def _execute(self, job: _Job) -> bool:
        """Run the job; True when it succeeded and its connection stays in service."""
        pool = self.pool
        profile = pool.profile
        attempts = 0
        while True:
            try:
                value = job.op(profile, self.conn)
            except Exception as exc:
                kind = profile.classify(exc)
                if kind is ErrorKind.CONNECTION_LOST:
                    self._drop()
                    if job.retriable and attempts < pool.cfg.retries and job.state == RUNNING and self._connect_once():
                        attempts += 1
                        pool.completions.push(pool._on_retry, self)
                        continue
                    self._fail(job, kind, exc)
                    self.pin_owner = None
                    self._connect_loop()
                    return False
                if not job.try_finish():
                    self._abandoned()
                    return False
                pool.completions.push(pool._deliver, job, False, (kind, exc))
                return False
            if isinstance(value, _StreamState):
                return self._pump(job, value)
            if not job.try_finish():
                self._abandoned()
                return False
            pool.completions.push(pool._deliver, job, True, value)
            return True

    def _fail(self, job: _Job, kind: ErrorKind, exc: BaseException) -> None:
        if job.try_finish():
            self.pool.completions.push(self.pool._deliver, job, False, (kind, exc))

    def _abandoned(self) -> None:
        """The caller gave up (timeout, cancel, early stream close): never reuse this connection."""
        self.pin_owner = None
        self._recycle()

    def _pump(self, job: _Job, state: _StreamState) -> bool:
        """Send row batches one at a time; wait for the consumer's credit before the next (backpressure)."""
        pool = self.pool
        credits = job.stream_credits
        assert credits is not None
        it = state.batches
        ok = True
        pool.completions.push(pool._stream_batch, job, state.columns, None)
        while True:
            try:
                more = credits.get(timeout=pool.cfg.stream_idle_timeout_s)
            except queue.Empty:
                more = False
            if not more or job.state != RUNNING:
                ok = False
                break
            try:
                batch = next(it, None)
            except Exception as exc:
                kind = pool.profile.classify(exc)
                pool.completions.push(pool._stream_error, job, kind, exc)
                ok = False
                break
            pool.completions.push(pool._stream_batch, job, None, batch)
            if batch is None:
                break
        if ok:
            try:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            except Exception:
                ok = False
        if ok and job.try_finish():
            return True
        with job.lock:
            if job.state == RUNNING:
                job.state = DONE
        self._drop()  # first the connection, so closing the cursor below cannot block on it
        with contextlib.suppress(Exception):
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._connect_loop()
        return False


def _lower_thread_priority(nice: int) -> None:
    """Make the calling thread (only it: Linux nice values are per thread) `nice` steps nicer.

    The worker threads and the event loop share the GIL and the CPUs. When the machine is busy, a
    worker that the OS runs instead of the loop thread delays every coroutine; a slightly lower
    priority for workers keeps the loop responsive at the same throughput."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except (OSError, AttributeError):  # not permitted / not supported: run at normal priority
        pass


@dataclass
class _StreamState:
    columns: list[str]
    batches: Iterator[list[Row]]


class _Pool:
    """The workers of one database shard, their job queue, and the loop-side bookkeeping."""

    def __init__(
        self, database: str, shard: int, dsn: str, cfg: DatabaseSettings, profile: DriverProfile,
        io_timeout: float, canceller: ThreadPoolExecutor,
    ) -> None:
        self.database = database
        self.label = database if shard == 0 and not cfg.shards else f"{database}#{shard}"
        self.dsn = dsn
        # the config key of a DSN with `secret:` references until `Database.resolve` replaced them
        self.config_key = f"db.databases.{database}.shards[{shard}]" if cfg.shards else f"db.databases.{database}.dsn"
        self.unresolved = has_refs(dsn)
        self.redactions: list[str] = [] if self.unresolved else dsn_redactions(dsn)  # kept out of log lines
        self.cfg = cfg
        self.profile = profile
        self.io_timeout = io_timeout
        self.tx_idle_timeout = cfg.transaction_idle_timeout_s
        self.app_name = f"{cfg.application_name}:{database}"[:60]
        self.canceller = canceller
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # guards `idle` and `waiting` (loop thread and workers)
        self.idle: list[_Worker] = []  # LIFO
        self.waiting: collections.deque[_Job] = collections.deque()  # jobs no free worker took yet
        self.workers: list[_Worker] = []
        self.live = 0
        self.down = False  # the latest connect attempt failed and no connection is live
        self.attempted: set[int] = set()
        self.last_error_at = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.completions: _Completions
        self._first_round = asyncio.Event()
        self.mq: dict[str, Any] = {
            "reconnects": m.RECONNECTS.labels(database),
            "cancels": m.CANCELS.labels(database),
        }

    def why(self, exc: BaseException) -> str:
        """An exception as one log line, without the DSN's password or secret values."""
        return redact(_one_line(exc), self.redactions)

    # --- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.completions = _Completions(self.loop)
        for i in range(self.cfg.pool_size):
            w = _Worker(self, i)
            self.workers.append(w)
            w.start()

    async def wait_first_round(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._first_round.wait()

    async def stop(self, timeout: float) -> None:
        self.stopping.set()
        self._fail_queued(lambda: dberr.unavailable(self.database, 1))
        for w in self.workers:
            w.inbox.put(_STOP)
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        for w in self.workers:
            remaining = max(0.0, deadline - time.monotonic())
            await loop.run_in_executor(None, w.join, remaining)

    def _fail_queued(self, make: Callable[[], XCError]) -> None:
        with self.lock:
            jobs = list(self.waiting)
            self.waiting.clear()
        for job in jobs:
            if job.try_withdraw() and job.fut is not None and not job.fut.done():
                job.fut.set_exception(make())

    # --- loop-side callbacks (called via completions) -------------------------------------------
    def _on_ready(self, w: _Worker) -> None:
        if not w.connected:
            w.connected = True
            self.live += 1
        self.down = False
        self._mark_attempt(w)

    def _on_connect_failed(self, w: _Worker) -> None:
        self.last_error_at = time.monotonic()
        self._mark_attempt(w)
        if self.live == 0:
            self.down = True  # nobody can serve: fail the queue now instead of letting it time out
            self._fail_queued(lambda: dberr.unavailable(self.database, self.cfg.reconnect_backoff_max_s))

    def _mark_attempt(self, w: _Worker) -> None:
        if len(self.attempted) < len(self.workers):
            self.attempted.add(id(w))
            if len(self.attempted) >= len(self.workers):
                self._first_round.set()

    def _on_dropped(self, w: _Worker) -> None:
        if w.connected:
            w.connected = False
            self.live -= 1
        self.mq["reconnects"].inc()

    def _on_retry(self, w: _Worker) -> None:
        if not w.connected:
            w.connected = True
            self.live += 1

    def _deliver(self, job: _Job, ok: bool, value: Any) -> None:
        fut = job.fut
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(_Failure(*value))

    def _stream_batch(self, job: _Job, columns: list[str] | None, batch: list[Row] | None) -> None:
        fut = job.fut
        if fut is not None and not fut.done():
            fut.set_result((columns, batch))

    def _stream_error(self, job: _Job, kind: ErrorKind, exc: BaseException) -> None:
        fut = job.fut
        if fut is not None and not fut.done():
            fut.set_exception(_Failure(kind, exc))

    # --- submitting and timing jobs -------------------------------------------------------------
    def idle_workers(self) -> int:
        return len(self.idle)

    async def run(
        self, job: _Job, timeout: float, on_timeout: Callable[[], XCError], target: _Worker | None = None
    ) -> Any:
        """Queue `job` (or hand it to the pinned `target`) and wait for its result."""
        loop = self.loop
        assert loop is not None, "database not started"
        fut: asyncio.Future[Any] = loop.create_future()
        job.fut = fut
        if target is None:
            if self.stopping.is_set() or (self.live == 0 and self.down):
                m.REJECTS.labels(self.database, "unavailable").inc()
                raise dberr.unavailable(self.database, self.cfg.reconnect_backoff_max_s)
            with self.lock:
                if self.idle:
                    target = self.idle.pop()
                elif len(self.waiting) < self.cfg.max_waiting:
                    self.waiting.append(job)
                else:
                    m.REJECTS.labels(self.database, "queue_full").inc()
                    raise dberr.pool_exhausted(self.database, 0.0, self.cfg.pool_wait_timeout_s)
            first = min(self.cfg.pool_wait_timeout_s, timeout)
        else:
            first = timeout
        if target is not None:
            target.inbox.put(job)
        job.handle = loop.call_later(first, self._first_timer, job, timeout, on_timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            self.abandon(job)
            raise
        finally:
            if job.handle is not None:
                job.handle.cancel()

    def _first_timer(self, job: _Job, timeout: float, on_timeout: Callable[[], XCError]) -> None:
        fut = job.fut
        if fut is None or fut.done():
            return
        if job.try_withdraw():  # never started: no connection freed up in time
            m.REJECTS.labels(self.database, "wait_timeout").inc()
            wait = min(self.cfg.pool_wait_timeout_s, timeout)
            fut.set_exception(dberr.pool_exhausted(self.database, wait, self.cfg.pool_wait_timeout_s))
            return
        remaining = job.started + timeout - time.monotonic()
        if remaining <= 0:
            self._timeout(job, on_timeout)
        else:
            assert self.loop is not None
            job.handle = self.loop.call_later(remaining, self._timeout, job, on_timeout)

    def _timeout(self, job: _Job, make_error: Callable[[], XCError]) -> None:
        fut = job.fut
        if fut is None or fut.done():
            return
        self.abandon(job)
        fut.set_exception(make_error())

    def abandon(self, job: _Job) -> None:
        """The caller stopped waiting: withdraw a queued job; cancel a running one server-side (its
        connection is then never reused)."""
        with job.lock:
            state = job.state
            if state == QUEUED:
                job.state = WITHDRAWN
                return
            if state != RUNNING:
                return
            job.state = ABANDONED
        w = job.worker
        if job.stream_credits is not None:
            job.stream_credits.put(False)
        if w is None:
            return
        conn, session = w.conn, w.session
        if conn is None:
            return
        self.mq["cancels"].inc()
        self.canceller.submit(self._cancel, w, conn, session)

    def _cancel(self, w: _Worker, conn: Any, session: Any) -> None:  # canceller thread
        with w.conn_lock:
            if w.conn is not conn:
                return  # already closed and replaced: nothing left to cancel
            try:
                self.profile.cancel(conn, session, self.dsn, timeout=min(5.0, self.cfg.connect_timeout_s))
            except Exception as exc:
                log.info("db %s: cancel of session %s failed: %s", self.label, session, self.why(exc))


class TransactionClosed(Exception):
    """A statement of a transaction that its connection no longer holds."""


class _Failure(Exception):
    """A driver error carried from a worker to the loop: (kind, original exception or None)."""

    def __init__(self, kind: ErrorKind, exc: BaseException | None) -> None:
        super().__init__(kind, exc)
        self.kind = kind
        self.exc = exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


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
            _Pool(name, i, dsn, cfg, self.profile, io_timeout, canceller) for i, dsn in enumerate(cfg.shard_dsns())
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

    def shard_for(self, value: Any) -> _Pool:
        n = len(self.pools)
        if n == 1:
            return self.pools[0]
        key = value if isinstance(value, bytes) else str(value).encode()
        return self.pools[zlib.crc32(key) % n]

    def _pool_for(self, q: NamedQuery, params: dict[str, Any]) -> _Pool:
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
            job = _Job(op, retriable=q.read_only)
            try:
                result: QueryResult = await pool.run(job, t, lambda: dberr.query_timeout(self.name, q.name, t))
            except _Failure as f:
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
                pool.run(_Job(_query_op(q.statements[0], values, q.max_rows), retriable=True), t,
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
        except _Failure as f:
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
            raise BadRequest(f"query {self.name}/{name} writes; only read-only queries stream", code="not_streamable")
        if q.settings.fan_out and len(self.pools) > 1:
            raise BadRequest(f"query {self.name}/{name} fans out over shards; it cannot stream", code="not_streamable")
        values = q.validate(params)
        pool = self._pool_for(q, values)
        t = timeout or q.timeout_s
        sql = q.statements[0]
        batch_rows = self.cfg.stream_batch_rows

        def op(profile: DriverProfile, conn: Any) -> _StreamState:
            cols, batches = profile.stream(conn, sql, values, batch_rows)
            return _StreamState(cols, batches)

        job = _Job(op, retriable=False)
        job.stream_credits = queue.SimpleQueue()
        stream = RowStream(self, q, pool, job, t)
        try:
            cols, _ = await pool.run(job, t, stream._timeout_error)
        except _Failure as f:
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
            raise BadRequest(f"database {self.name!r} is sharded: a transaction needs a shard key", code="shard_key")
        pool = self.shard_for(shard_key) if len(self.pools) > 1 else self.pools[0]
        return Transaction(self, pool, timeout or self.cfg.query_timeout_s)


class RowStream:
    """Row batches of a streaming query: `async for rows in stream`; `await stream.aclose()` early."""

    def __init__(self, db: Database, q: NamedQuery, pool: _Pool, job: _Job, timeout: float) -> None:
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
                f"{self.db.cfg.stream_idle_timeout_s:g}s and was closed", code="stream_idle_timeout")
        loop = pool.loop
        assert loop is not None and job.stream_credits is not None
        fut: asyncio.Future[Any] = loop.create_future()
        job.fut = fut
        job.stream_credits.put(True)
        handle = loop.call_later(self.timeout, pool._timeout, job, self._timeout_error)
        try:
            _, rows = await fut
        except _Failure as f:
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

    def __init__(self, db: Database, pool: _Pool, timeout: float) -> None:
        self.db = db
        self.pool = pool
        self.timeout = timeout
        self.worker: _Worker | None = None
        self.broken = False
        self.done = False

    async def __aenter__(self) -> Transaction:
        job = _Job(lambda p, c: p.begin(c), retriable=False, pin=True, tx=self)
        await self._run(job, "begin")
        self.worker = job.worker
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        if self.broken and et is None:  # never let a block end as if it had committed
            raise dberr.DbError("the transaction was not committed: it failed earlier", code="transaction_closed")
        if self.broken or self.done or self.worker is None:
            return
        self.done = True
        if et is None:
            await self._run(_Job(lambda p, c: p.commit(c), retriable=False, unpin=True), "commit", self.worker)
        else:
            with contextlib.suppress(Exception):
                await self._run(_Job(lambda p, c: p.rollback(c), retriable=False, unpin=True), "rollback",
                                self.worker)

    async def query(self, name: str, params: Any = None) -> QueryResult:
        w = self.worker
        if self.broken or self.done or w is None or w.pin_owner is not self:
            self.broken = self.broken or not self.done
            raise dberr.DbError("the transaction is over (failed, committed or rolled back)", code="transaction_closed")
        q = self.db.query_named(name)
        values = q.validate(params)
        pools = self.db.pools
        if len(pools) > 1 and q.shard_key is not None and self.db.shard_for(values[q.shard_key]) is not self.pool:
            raise BadRequest(f"query {name}: its shard key routes to another shard than this transaction's",
                             code="shard_mismatch")
        if len(q.statements) != 1:
            raise BadRequest(f"query {name} is itself a transaction", code="nested_transaction")
        job = _Job(_query_op(q.statements[0], values, q.max_rows), retriable=False)
        result: QueryResult = await self._run(job, q.name, w)
        return result

    async def _run(self, job: _Job, what: str, target: _Worker | None = None) -> Any:
        job.tx = self
        try:
            return await self.pool.run(
                job, self.timeout, lambda: dberr.query_timeout(self.db.name, what, self.timeout), target
            )
        except _Failure as f:
            if isinstance(f.exc, TransactionClosed):
                self.broken = True
                raise dberr.DbError("the transaction is over (idle too long or its connection was replaced)",
                                    code="transaction_closed") from None
            if f.kind is ErrorKind.CONNECTION_LOST:
                self.broken = True  # the worker unpinned itself and is reconnecting
            raise dberr.from_driver(f.kind, self.db.name, what, f.exc or ConnectionError("lost")) from None
        except BaseException:
            if job.state == ABANDONED:
                self.broken = True  # timed out / cancelled: the worker recycles its connection
            raise


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
