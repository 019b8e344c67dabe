"""The connection-owning thread pool: one per database shard, each thread holding one connection for life.

A blocking DB-API driver never runs on the event loop. Each worker thread owns exactly one connection
for its whole life (connection affinity: a connection never crosses threads). A call goes:

    job into the shard's queue (bounded: full -> 503) -> the next free worker takes it, runs it
    in its own thread, and takes the next job at once -> the result is handed back to the loop
    with one batched wake-up (many results, one `call_soon_threadsafe`: `db/completions.py`).

A job not started within `pool_wait_timeout_s` is withdrawn (503 + Retry-After). A job's state
(queued / running / done / abandoned) changes under its own lock, so "withdrawn", "timed out" and
"finished" can never both happen. Timeouts: a timer on the loop marks a running job abandoned,
answers 504 at once and sends the profile's server-side cancel (psycopg cancel, `KILL QUERY` from
a side connection, ...) from a canceller thread; the worker then discards that connection and opens
a fresh one: a connection that was cancelled, lost, or abandoned by its caller is never reused.
Lost connections are replaced with exponential backoff; while no connection is live, callers get
503 `db_unavailable` at once. Transactions pin one worker (and so one connection) until they end.

What a job does (a query, a transaction, a stream) is the caller's business (`db/database.py`);
this module only runs jobs, times them and keeps the connections healthy.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xcstack.db import errors as dberr
from xcstack.db import metrics as m
from xcstack.db.completions import Completions
from xcstack.db.profiles import DriverProfile, ErrorKind, Row
from xcstack.db.settings import DatabaseSettings
from xcstack.errors import XCError
from xcstack.security.secrets import dsn_redactions, has_refs, redact

log = logging.getLogger("xcstack.db")


QUEUED, RUNNING, DONE, WITHDRAWN, ABANDONED = range(5)


class Job:
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
        self.worker: Worker | None = None
        self.stream_credits: queue.SimpleQueue[bool] | None = None

    def try_start(self, worker: Worker) -> bool:  # worker thread
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


class Worker(threading.Thread):
    """One thread, one connection, for life."""

    def __init__(self, pool: Pool, index: int) -> None:
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

    def _run_job(self, job: Job) -> None:
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

    def _execute(self, job: Job) -> bool:
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
            if isinstance(value, StreamState):
                return self._pump(job, value)
            if not job.try_finish():
                self._abandoned()
                return False
            pool.completions.push(pool._deliver, job, True, value)
            return True

    def _fail(self, job: Job, kind: ErrorKind, exc: BaseException) -> None:
        if job.try_finish():
            self.pool.completions.push(self.pool._deliver, job, False, (kind, exc))

    def _abandoned(self) -> None:
        """The caller gave up (timeout, cancel, early stream close): never reuse this connection."""
        self.pin_owner = None
        self._recycle()

    def _pump(self, job: Job, state: StreamState) -> bool:
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
class StreamState:
    columns: list[str]
    batches: Iterator[list[Row]]


class Pool:
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
        self.idle: list[Worker] = []  # LIFO
        self.waiting: collections.deque[Job] = collections.deque()  # jobs no free worker took yet
        self.workers: list[Worker] = []
        self.live = 0
        self.down = False  # the latest connect attempt failed and no connection is live
        self.attempted: set[int] = set()
        self.last_error_at = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.completions: Completions
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
        self.completions = Completions(self.loop)
        for i in range(self.cfg.pool_size):
            w = Worker(self, i)
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
    def _on_ready(self, w: Worker) -> None:
        if not w.connected:
            w.connected = True
            self.live += 1
        self.down = False
        self._mark_attempt(w)

    def _on_connect_failed(self, w: Worker) -> None:
        self.last_error_at = time.monotonic()
        self._mark_attempt(w)
        if self.live == 0:
            self.down = True  # nobody can serve: fail the queue now instead of letting it time out
            self._fail_queued(lambda: dberr.unavailable(self.database, self.cfg.reconnect_backoff_max_s))

    def _mark_attempt(self, w: Worker) -> None:
        if len(self.attempted) < len(self.workers):
            self.attempted.add(id(w))
            if len(self.attempted) >= len(self.workers):
                self._first_round.set()

    def _on_dropped(self, w: Worker) -> None:
        if w.connected:
            w.connected = False
            self.live -= 1
        self.mq["reconnects"].inc()

    def _on_retry(self, w: Worker) -> None:
        if not w.connected:
            w.connected = True
            self.live += 1

    def _deliver(self, job: Job, ok: bool, value: Any) -> None:
        fut = job.fut
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(JobFailure(*value))

    def _stream_batch(self, job: Job, columns: list[str] | None, batch: list[Row] | None) -> None:
        fut = job.fut
        if fut is not None and not fut.done():
            fut.set_result((columns, batch))

    def _stream_error(self, job: Job, kind: ErrorKind, exc: BaseException) -> None:
        fut = job.fut
        if fut is not None and not fut.done():
            fut.set_exception(JobFailure(kind, exc))

    # --- submitting and timing jobs -------------------------------------------------------------
    def idle_workers(self) -> int:
        return len(self.idle)

    async def run(
        self, job: Job, timeout: float, on_timeout: Callable[[], XCError], target: Worker | None = None
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

    def _first_timer(self, job: Job, timeout: float, on_timeout: Callable[[], XCError]) -> None:
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
            self.expire(job, on_timeout)
        else:
            assert self.loop is not None
            job.handle = self.loop.call_later(remaining, self.expire, job, on_timeout)

    def expire(self, job: Job, make_error: Callable[[], XCError]) -> None:
        """The job's time is up: abandon it (server-side cancel) and answer its caller with `make_error()`."""
        fut = job.fut
        if fut is None or fut.done():
            return
        self.abandon(job)
        fut.set_exception(make_error())

    def abandon(self, job: Job) -> None:
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

    def _cancel(self, w: Worker, conn: Any, session: Any) -> None:  # canceller thread
        with w.conn_lock:
            if w.conn is not conn:
                return  # already closed and replaced: nothing left to cancel
            try:
                self.profile.cancel(conn, session, self.dsn, timeout=min(5.0, self.cfg.connect_timeout_s))
            except Exception as exc:
                log.info("db %s: cancel of session %s failed: %s", self.label, session, self.why(exc))


class TransactionClosed(Exception):
    """A statement of a transaction that its connection no longer holds."""


class JobFailure(Exception):
    """A driver error carried from a worker to the loop: (kind, original exception or None)."""

    def __init__(self, kind: ErrorKind, exc: BaseException | None) -> None:
        super().__init__(kind, exc)
        self.kind = kind
        self.exc = exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
