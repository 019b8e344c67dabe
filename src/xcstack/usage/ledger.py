"""The usage ledger: one record per call, written in batches to the state store, with hourly and daily
roll-ups kept in the same transaction and a retention pass.

`enqueue` only appends to an in-memory buffer (no I/O on the request path). The writer flushes it every
`ledger_flush_ms`, or at once when `ledger_batch_max` records wait, in one transaction: the raw records
and the roll-up increments together, so the roll-ups always agree with the records. What a crash
(kill -9) can lose is the buffer: the records of the last `ledger_flush_ms` plus one batch write, and
never more than `ledger_queue_max` (beyond that, new records are dropped and counted,
`xc_usage_ledger_dropped_total`, rather than growing without bound).

A batch the database refuses for its data (a constraint, a value out of range: `data_error`) is split
in halves until the refused records are alone; those are quarantined (an ERROR log line with the
record, `xc_usage_ledger_quarantined_total`, a row in `usage_dead_letters`) and the rest is written, so
one bad record never blocks the ledger. Any other failure (the database unreachable) keeps what is not
yet written in the buffer and retries it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Histogram

from xcstack.state.store import StateStore, Tx
from xcstack.usage.periods import Calendar

log = logging.getLogger("xcstack.usage.ledger")

WRITTEN = Counter("xc_usage_ledger_records", "Usage records written to the ledger")
DROPPED = Counter("xc_usage_ledger_dropped", "Usage records dropped: the ledger buffer was full")
QUARANTINED = Counter("xc_usage_ledger_quarantined",
                      "Usage records the database refused (constraint, bad value): set aside in usage_dead_letters")
FLUSH_S = Histogram("xc_usage_ledger_flush_seconds", "Time to write one ledger batch",
                    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))

# ts, key_id, user_id, group_name, model, upstream, endpoint, input_tokens, output_tokens, cost_micro,
# price_version, estimated, status, latency_ms, request_id
Record = tuple[float, str, str, str, str, str, str, int, int, int, str, int, int, float, str]
COLUMNS = ("ts, key_id, user_id, group_name, model, upstream, endpoint, input_tokens, output_tokens, cost_micro, "
           "price_version, estimated, status, latency_ms, request_id")
COLUMN_NAMES = tuple(c.strip() for c in COLUMNS.split(","))
DIMS = ("key_id", "user_id", "group_name", "model", "upstream")

_ROLLUP = """
CREATE TABLE IF NOT EXISTS usage_{name} (
    {bucket} {btype} NOT NULL, key_id TEXT NOT NULL, user_id TEXT NOT NULL, group_name TEXT NOT NULL,
    model TEXT NOT NULL, upstream TEXT NOT NULL, requests BIGINT NOT NULL, input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL, cost_micro BIGINT NOT NULL, estimated BIGINT NOT NULL,
    PRIMARY KEY ({bucket}, key_id, user_id, group_name, model, upstream));
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_records (
    id {serial}, ts {real} NOT NULL, key_id TEXT NOT NULL, user_id TEXT NOT NULL, group_name TEXT NOT NULL,
    model TEXT NOT NULL, upstream TEXT NOT NULL, endpoint TEXT NOT NULL, input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL, cost_micro BIGINT NOT NULL, price_version TEXT NOT NULL,
    estimated INTEGER NOT NULL, status INTEGER NOT NULL, latency_ms {real} NOT NULL, request_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS usage_records_ts ON usage_records (ts);
CREATE INDEX IF NOT EXISTS usage_records_user ON usage_records (user_id, ts);
CREATE TABLE IF NOT EXISTS usage_quotas (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, subject TEXT NOT NULL, metric TEXT NOT NULL, period TEXT NOT NULL,
    qlimit {real} NOT NULL, hard INTEGER NOT NULL, created_at {real} NOT NULL, created_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage_price_versions (
    version TEXT PRIMARY KEY, currency TEXT NOT NULL, prices TEXT NOT NULL, first_seen {real} NOT NULL);
""" + _ROLLUP.format(name="hourly", bucket="hour", btype="BIGINT") + _ROLLUP.format(name="daily", bucket="day",
                                                                                      btype="TEXT")

_DEAD = """
CREATE TABLE IF NOT EXISTS usage_dead_letters (
    id {serial}, ts {real} NOT NULL, reason TEXT NOT NULL, record TEXT NOT NULL);
"""

MIGRATIONS: list[Any] = [
    {"sqlite": _SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"),
     "postgres": _SCHEMA.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")},
    {"sqlite": _DEAD.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"),
     "postgres": _DEAD.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")},
]

# DB-API exception classes (sqlite3's, psycopg's) that blame the rows, not the database
_DATA_ERRORS = frozenset({"IntegrityError", "DataError"})


def data_error(exc: BaseException) -> bool:
    """Whether the database refused the rows themselves (so the same rows would be refused forever):
    a constraint or a bad value, or a value the driver cannot send (sqlite3's binding errors). Not a
    schema or connection problem (`OperationalError`; PostgreSQL's `ProgrammingError`: a missing
    table), which would refuse every record alike and is retried instead."""
    if isinstance(exc, (TypeError, ValueError, OverflowError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return True
    return any(k.__name__ in _DATA_ERRORS for k in type(exc).__mro__)


class _Unwritten(Exception):
    """A batch write stopped on a failure that is not the data's: `rest` is still to be written."""

    def __init__(self, rest: list[Record], cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.rest = rest
        self.cause = cause


def _upsert(table: str, bucket: str) -> str:
    return (f"INSERT INTO usage_{table} ({bucket}, key_id, user_id, group_name, model, upstream, requests, "
            "input_tokens, output_tokens, cost_micro, estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT ({bucket}, key_id, user_id, group_name, model, upstream) DO UPDATE SET "
            f"requests = usage_{table}.requests + excluded.requests, "
            f"input_tokens = usage_{table}.input_tokens + excluded.input_tokens, "
            f"output_tokens = usage_{table}.output_tokens + excluded.output_tokens, "
            f"cost_micro = usage_{table}.cost_micro + excluded.cost_micro, "
            f"estimated = usage_{table}.estimated + excluded.estimated")


UPSERT_HOURLY = _upsert("hourly", "hour")
UPSERT_DAILY = _upsert("daily", "day")


def rollups(batch: Sequence[Record], calendar: Calendar) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The hourly (UTC hour epoch) and daily (local day) increments of a batch."""
    hourly: dict[tuple[Any, ...], list[int]] = {}
    daily: dict[tuple[Any, ...], list[int]] = {}
    days: dict[int, str] = {}
    for r in batch:
        hour = int(r[0]) // 3600 * 3600
        day = days.get(hour)
        if day is None:
            day = days[hour] = calendar.day(hour + 1800)  # an hour lies in one local day (whole-hour zones)
        dims = (r[1], r[2], r[3], r[4], r[5])
        for table, bucket in ((hourly, hour), (daily, day)):
            acc = table.get((bucket, *dims))
            if acc is None:
                acc = table[(bucket, *dims)] = [0, 0, 0, 0, 0]
            acc[0] += 1
            acc[1] += r[7]
            acc[2] += r[8]
            acc[3] += r[9]
            acc[4] += r[11]
    return [(*k, *v) for k, v in hourly.items()], [(*k, *v) for k, v in daily.items()]


class Ledger:
    def __init__(self, store: StateStore, calendar: Calendar, *, flush_ms: int = 200, batch_max: int = 2000,
                 queue_max: int = 100_000, retention_days: int = 400) -> None:
        self.store = store
        self.calendar = calendar
        self.flush_s = flush_ms / 1000
        self.batch_max = batch_max
        self.queue_max = queue_max
        self.retention_s = retention_days * 86400
        self.buf: list[Record] = []
        self.dropped = 0
        self.quarantined = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def migrate(self) -> None:
        await self.store.migrate("usage", MIGRATIONS)

    def enqueue(self, record: Record) -> None:
        """Queue one record (never blocks; dropped and counted when the buffer is full)."""
        buf = self.buf
        if len(buf) >= self.queue_max:
            self.dropped += 1
            DROPPED.inc()
            return
        buf.append(record)
        if len(buf) >= self.batch_max:
            self._wake.set()

    async def write(self, batch: Sequence[Record]) -> None:
        """One transaction: the records and their roll-up increments."""
        hourly, daily = rollups(batch, self.calendar)

        def run(tx: Tx) -> None:
            tx.insert_rows("usage_records", COLUMN_NAMES, batch)
            tx.executemany(UPSERT_HOURLY, sorted(hourly))  # sorted: concurrent writers lock rows in one order
            tx.executemany(UPSERT_DAILY, sorted(daily))

        await self.store.transaction(run)

    async def flush(self) -> int:
        """Write what is buffered now, in batches of at most `batch_max`; returns the records written.
        Records the database refuses are quarantined (`write_isolating`); on any other failure what is
        not written goes back to the front of the buffer (bounded by queue_max) and the error is raised."""
        n = 0
        while self.buf:
            batch = self.buf[: self.batch_max]
            del self.buf[: len(batch)]
            t0 = time.perf_counter()
            try:
                n += await self.write_isolating(batch)
            except _Unwritten as exc:
                log.error("usage ledger: writing %d records failed (%r); retrying", len(exc.rest), exc.cause)
                self.buf[:0] = exc.rest[: max(0, self.queue_max - len(self.buf))]
                raise exc.cause from None
            FLUSH_S.observe(time.perf_counter() - t0)
        return n

    async def write_isolating(self, batch: list[Record]) -> int:
        """Write `batch`; when the database refuses its data, halve it until the refused records stand
        alone (about 2·log2(batch) writes for one bad record), quarantine those and write the rest, in
        order. Returns the records written; raises `_Unwritten` with the rest on any other failure."""
        pending: list[list[Record]] = [batch]  # a stack: the next chunk to write last
        n = 0
        while pending:
            chunk = pending.pop()
            try:
                await self.write(chunk)
            except Exception as exc:
                if not data_error(exc):
                    raise _Unwritten([r for c in (chunk, *reversed(pending)) for r in c], exc) from exc
                if len(chunk) == 1:
                    await self.quarantine(chunk[0], exc)
                else:
                    mid = len(chunk) // 2
                    pending += (chunk[mid:], chunk[:mid])
                continue
            WRITTEN.inc(len(chunk))
            n += len(chunk)
        return n

    async def quarantine(self, record: Record, exc: BaseException) -> None:
        """Set aside one record the database refused: logged in full, counted, and kept in
        `usage_dead_letters` (as JSON) for an operator to inspect; never retried."""
        self.quarantined += 1
        QUARANTINED.inc()
        text = json.dumps(list(record), default=repr)  # ASCII: a NUL becomes \u0000, which any TEXT takes
        reason = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")[:1000]
        log.error("usage ledger: record refused by the database, quarantined (%s): %s", reason, text)
        try:
            await self.store.execute("INSERT INTO usage_dead_letters (ts, reason, record) VALUES (?, ?, ?)",
                                     (time.time(), reason, text))
        except Exception as exc2:  # the log line above keeps the record
            log.error("usage ledger: could not keep the refused record in usage_dead_letters: %r", exc2)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last_retention = 0.0
        while not self._stopping:
            try:
                async with asyncio.timeout(self.flush_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() - last_retention > 3600:
                    last_retention = time.monotonic()
                    await self.expire(time.time())
            except Exception:  # logged in flush; the writer keeps going
                await asyncio.sleep(min(1.0, self.flush_s))

    async def expire(self, now: float) -> int:
        """Delete raw records and hourly roll-ups past retention (the daily roll-ups stay)."""
        cut = now - self.retention_s

        def run(tx: Tx) -> int:
            n = tx.execute("DELETE FROM usage_records WHERE ts < ?", (cut,))
            tx.execute("DELETE FROM usage_hourly WHERE hour < ?", (int(cut) // 3600 * 3600,))
            tx.execute("DELETE FROM usage_dead_letters WHERE ts < ?", (cut,))
            return n

        return await self.store.transaction(run)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.flush()
        except Exception:
            log.error("usage ledger: %d records not written at stop", len(self.buf))
