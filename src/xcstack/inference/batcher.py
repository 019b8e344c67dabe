"""The dynamic batcher inside each model worker (one per loaded model).

Requests are split into items (one text, or one tensor request with its rows); items wait in a bounded
FIFO. A batch runs when the queue holds `max_batch` rows, or fills the token budget, or when the oldest
item has waited `max_wait`. A batch always contains the oldest item and is grown around it in length
order, so rows of similar length run together (less padding), within `max_batch` rows and
`longest x rows <= token_budget`. Only items with the same `key` (tensor signature) share a batch.

- Full queue: `submit` raises `QueueFull` at once (the http side answers 503 + Retry-After).
- Deadlines: an item whose request is past its deadline is dropped before it runs.
- Departed clients: `Job.cancel()` removes the request's items that have not run.
- Errors: a failing run fails only the requests with items in that batch.

The run function is blocking (ONNX Runtime) and goes to one executor thread, so the worker's event
loop keeps accepting and grouping requests while a batch runs. Tiny text batches (`inline_tokens`:
longest x rows at most this, e.g. one short sentence at low load) run on the loop thread instead: the
thread hand-off costs ~0.1-0.2 ms, a noticeable share of a 2 ms int8 run, and on a worker pinned to one
core the executor thread could not run in parallel with the loop anyway; requests that arrive meanwhile
wait in the socket buffer and are batched right after.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from xcstack.aio import cancel_and_wait
from xcstack.inference import metrics
from xcstack.inference.repository import BatchParams

log = logging.getLogger("xcstack.inference")


class WorkerCode(StrEnum):
    """Codes of a model worker's failures as they cross IPC to the http worker, which answers them with
    InferenceCode/CoreCode (`client.http_error`): not HTTP codes, so not in the error catalogue."""

    INFERENCE_ERROR = "inference_error"
    QUEUE_FULL = "queue_full"
    REQUEST_TOO_LARGE = "request_too_large"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    BATCH_FAILED = "batch_failed"
    WORKER_STOPPING = "worker_stopping"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_AN_EMBEDDING_MODEL = "not_an_embedding_model"
    NOT_A_RERANK_MODEL = "not_a_rerank_model"
    BUSY = "busy"  # the IPC channel's own: too many requests in flight on one connection


class BatcherError(Exception):
    code = WorkerCode.INFERENCE_ERROR
    retriable = False


class QueueFull(BatcherError):
    code = WorkerCode.QUEUE_FULL
    retriable = True


class RequestTooLarge(BatcherError):
    code = WorkerCode.REQUEST_TOO_LARGE


class DeadlineExceeded(BatcherError):
    code = WorkerCode.DEADLINE_EXCEEDED
    retriable = True


class BatchFailed(BatcherError):
    code = WorkerCode.BATCH_FAILED


class BatcherClosed(BatcherError):
    code = WorkerCode.WORKER_STOPPING
    retriable = True


@dataclass(eq=False)
class Item:
    job: Job
    index: int
    rows: int
    length: int
    data: Any
    key: Hashable = None
    enq: float = 0.0


@dataclass(eq=False)
class Job:
    """One client request: its items, their results, one future."""

    future: asyncio.Future[list[Any]]
    deadline: float
    count: int
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    on_cancel: Callable[[Job], None] | None = None

    def __post_init__(self) -> None:
        self.results = [None] * self.count
        self.remaining = self.count

    @property
    def done(self) -> bool:
        return self.cancelled or self.future.done()

    def cancel(self) -> None:
        """The client left: its queued rows leave the queue now (and free their capacity)."""
        if self.cancelled:
            return
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()
        if self.on_cancel is not None:
            self.on_cancel(self)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def deliver(self, index: int, value: Any) -> None:
        if self.future.done():
            return
        self.results[index] = value
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.results)


RunFn = Callable[[list[Item]], Sequence[Any]]


class Batcher:
    def __init__(
        self,
        name: str,
        run: RunFn,
        params: BatchParams,
        *,
        executor: concurrent.futures.Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        window_factor: int = 4,
        inline_tokens: int = 0,
    ) -> None:
        self.name = name
        self._run = run
        self.params = params
        self._executor = executor
        self._own_executor = executor is None
        self._clock = clock
        self._queue: collections.deque[Item] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._window = max(1, window_factor) * params.max_batch
        self.batches_run = 0
        self.rows_run = 0
        self.rows_cancelled = 0  # queued rows withdrawn by Job.cancel (departed clients)
        self.inline_runs = 0
        self.busy = False
        self.inline_tokens = inline_tokens
        # metric children bound once: labels() costs more than the update, several times per request
        self._m_queue = metrics.QUEUE_ROWS.labels(name)
        self._m_rows = metrics.BATCH_ROWS.labels(name)
        self._m_seconds = metrics.BATCH_SECONDS.labels(name)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"run-{self.name}")
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait([self._task])
        self._task = None
        while self._queue:
            item = self._queue.popleft()
            item.job.fail(BatcherClosed(f"model {self.name} is unloading"))
        self._queued_rows = 0
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # --- submission ------------------------------------------------------------------------------
    def submit(
        self, entries: Sequence[tuple[int, int, Any]], deadline: float, key: Hashable = None
    ) -> Job:
        """Queue one request made of `(rows, length, data)` entries; returns its Job (await job.future).

        Raises QueueFull at once when the rows would not fit, BatcherClosed when stopping."""
        if self._closed:
            raise BatcherClosed(f"model {self.name} is unloading")
        rows = sum(e[0] for e in entries)
        if rows > self.params.max_queue:  # would never fit: not a retriable overload
            raise RequestTooLarge(
                f"model {self.name}: {rows} rows in one request; the model's queue holds {self.params.max_queue}"
            )
        if self._queued_rows + rows > self.params.max_queue:
            metrics.DROPPED.labels(self.name, "queue_full").inc(rows)
            raise QueueFull(
                f"model {self.name}: queue full ({self._queued_rows} rows queued, limit {self.params.max_queue})"
            )
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        job = Job(fut, deadline, len(entries), on_cancel=self._discard)
        if not entries:
            fut.set_result([])
            return job
        now = self._clock()
        for i, (r, length, data) in enumerate(entries):
            self._queue.append(Item(job, i, r, max(1, length), data, key, now))
        self._queued_rows += rows
        self._m_queue.set(self._queued_rows)
        self._wakeup.set()
        return job

    def _discard(self, job: Job) -> None:
        before = len(self._queue)
        self._queue = collections.deque(it for it in self._queue if it.job is not job)
        if len(self._queue) != before:
            rows_before = self._queued_rows
            self._queued_rows = sum(i.rows for i in self._queue)
            self.rows_cancelled += rows_before - self._queued_rows
            metrics.DROPPED.labels(self.name, "cancelled").inc(rows_before - self._queued_rows)  # rows, as _purge
            self._m_queue.set(self._queued_rows)
            self._wakeup.set()

    # --- the loop --------------------------------------------------------------------------------
    def _purge(self) -> None:
        """Drop cancelled and expired items from the head (and count what went)."""
        now = self._clock()
        keep: collections.deque[Item] = collections.deque()
        for item in self._queue:
            if item.job.done:
                metrics.DROPPED.labels(self.name, "cancelled").inc(item.rows)
                continue
            if item.job.deadline <= now:
                metrics.DROPPED.labels(self.name, "deadline").inc(item.rows)
                item.job.fail(DeadlineExceeded(f"model {self.name}: request deadline passed while queued"))
                continue
            keep.append(item)
        self._queue = keep
        self._queued_rows = sum(i.rows for i in keep)
        self._m_queue.set(self._queued_rows)

    def _full(self) -> bool:
        if self._queued_rows >= self.params.max_batch:
            return True
        longest = 0
        rows = 0
        for item in self._queue:
            longest = max(longest, item.length)
            rows += item.rows
            if longest * rows >= self.params.token_budget:
                return True
        return False

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._purge()
            if not self._queue:
                continue
            # wait for a full batch or for the oldest item's max_wait
            await self._wait_for_batch()
            self._purge()
            if not self._queue:
                continue
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _wait_for_batch(self) -> None:
        if not self._queue or self._full():
            return
        head = self._queue[0]
        until = head.enq + self.params.max_wait_s
        while not self._full():
            left = until - self._clock()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return
            if self._queue and self._queue[0] is not head:
                return  # the head left (cancelled/expired): re-evaluate from the new head

    def _take(self) -> list[Item]:
        """The oldest item plus compatible neighbours in length order, within max_batch and the budget."""
        head = self._queue[0]
        window: list[Item] = []
        rows = 0
        for item in self._queue:
            if item.key == head.key:
                window.append(item)
                rows += item.rows
                if rows >= self._window:
                    break
        window.sort(key=lambda it: it.length)
        h = window.index(head)
        lo, hi = h, h
        longest, nrows = head.length, head.rows
        p = self.params
        while True:
            cands: list[tuple[int, int]] = []
            if lo > 0:
                cands.append((abs(window[lo - 1].length - head.length), lo - 1))
            if hi < len(window) - 1:
                cands.append((abs(window[hi + 1].length - head.length), hi + 1))
            added = False
            for _, idx in sorted(cands):
                it = window[idx]
                new_rows = nrows + it.rows
                new_longest = max(longest, it.length)
                if new_rows <= p.max_batch and new_longest * new_rows <= p.token_budget:
                    nrows, longest = new_rows, new_longest
                    if idx < lo:
                        lo = idx
                    else:
                        hi = idx
                    added = True
                    break
            if not added:
                break
        chosen = window[lo : hi + 1]
        chosen_ids = {id(it) for it in chosen}
        self._queue = collections.deque(it for it in self._queue if id(it) not in chosen_ids)
        self._queued_rows -= nrows
        self._m_queue.set(self._queued_rows)
        return chosen

    async def _execute(self, batch: list[Item]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(i.rows for i in batch)
        t0 = time.perf_counter()
        self.busy = True
        try:
            if (self.inline_tokens and batch[0].key is None
                    and max(i.length for i in batch) * rows <= self.inline_tokens):
                self.inline_runs += 1
                results = self._run(batch)
            else:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"run returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for item in batch:
                item.job.fail(BatcherClosed(f"model {self.name} is unloading"))
            raise
        except Exception as exc:
            log.warning("model %s: batch of %d rows failed: %r", self.name, rows, exc)
            err = BatchFailed(f"model {self.name}: the batch with this request failed: {exc}")
            for item in batch:
                item.job.fail(err)
            return
        finally:
            self.busy = False
        dt = time.perf_counter() - t0
        self.batches_run += 1
        self.rows_run += rows
        self._m_rows.observe(rows)
        self._m_seconds.observe(dt)
        for item, value in zip(batch, results, strict=True):
            item.job.deliver(item.index, value)

