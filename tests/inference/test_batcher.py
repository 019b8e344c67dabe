"""The dynamic batcher: size/time/token limits, length grouping, bounded queue, deadlines, cancellation,
per-batch failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from xcstack.inference.batcher import (
    Batcher,
    BatchFailed,
    DeadlineExceeded,
    Item,
    QueueFull,
)
from xcstack.inference.repository import BatchParams


class Recorder:
    """A run function that records each batch; optionally blocks until released or fails on 'bad'."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: list[Item]) -> list[Any]:
        self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        data = [it.data for it in batch]
        self.batches.append(data)
        if any(d == "bad" for d in data):
            raise ValueError("poisoned input")
        return [f"out:{d}" for d in data]


def make(run: Recorder, **kw: Any) -> Batcher:
    p = {"max_batch": 4, "max_wait_s": 0.005, "token_budget": 10_000, "max_queue": 100} | kw
    b = Batcher("t", run, BatchParams(**p))
    b.start()
    return b


def far() -> float:
    return time.monotonic() + 30


async def test_results_in_order_and_max_batch_respected() -> None:
    run = Recorder()
    b = make(run, max_batch=4)
    try:
        jobs = [b.submit([(1, 5, i)], far()) for i in range(10)]
        results = await asyncio.gather(*(j.future for j in jobs))
        assert [r[0] for r in results] == [f"out:{i}" for i in range(10)]
        assert all(len(batch) <= 4 for batch in run.batches)
        assert len(run.batches) < 10  # they were batched
    finally:
        await b.close()


async def test_multi_row_request_is_split_and_reassembled() -> None:
    run = Recorder()
    b = make(run, max_batch=3)
    try:
        job = b.submit([(1, 5, f"t{i}") for i in range(7)], far())
        assert await job.future == [f"out:t{i}" for i in range(7)]
        assert all(len(batch) <= 3 for batch in run.batches)
    finally:
        await b.close()


async def test_max_wait_timer_runs_a_lone_request() -> None:
    run = Recorder()
    b = make(run, max_batch=64, max_wait_s=0.08)
    try:
        t0 = time.monotonic()
        job = b.submit([(1, 5, "x")], far())
        await job.future
        waited = time.monotonic() - t0
        assert 0.07 <= waited < 1.0
    finally:
        await b.close()


async def test_full_batch_does_not_wait_for_the_timer() -> None:
    run = Recorder()
    b = make(run, max_batch=4, max_wait_s=2.0)
    try:
        t0 = time.monotonic()
        jobs = [b.submit([(1, 5, i)], far()) for i in range(4)]
        await asyncio.gather(*(j.future for j in jobs))
        assert time.monotonic() - t0 < 1.0
        assert run.batches == [[0, 1, 2, 3]]
    finally:
        await b.close()


async def test_token_budget_limits_longest_times_rows() -> None:
    run = Recorder()
    b = make(run, max_batch=32, token_budget=250, max_wait_s=0.01)
    try:
        jobs = [b.submit([(1, 100, i)], far()) for i in range(6)]
        await asyncio.gather(*(j.future for j in jobs))
        assert all(len(batch) * 100 <= 250 for batch in run.batches)
        assert sorted(x for batch in run.batches for x in batch) == list(range(6))
    finally:
        await b.close()


async def test_length_sorted_grouping_cuts_padding() -> None:
    run = Recorder()
    run.gate.clear()  # hold the first batch so the rest queue up together
    b = make(run, max_batch=3, max_wait_s=0.0)
    try:
        first = b.submit([(1, 1, "first")], far())
        await asyncio.sleep(0.05)
        lengths = {"s1": 5, "L1": 200, "s2": 6, "L2": 201, "s3": 7, "L3": 202}
        jobs = [b.submit([(1, n, name)], far()) for name, n in lengths.items()]
        run.gate.set()
        await first.future
        await asyncio.gather(*(j.future for j in jobs))
        groups = [set(batch) for batch in run.batches[1:]]
        assert {"s1", "s2", "s3"} in groups and {"L1", "L2", "L3"} in groups, run.batches
    finally:
        await b.close()


async def test_full_queue_rejects_at_once() -> None:
    run = Recorder()
    run.gate.clear()
    b = make(run, max_batch=1, max_queue=3, max_wait_s=0.0)
    try:
        running = b.submit([(1, 1, "r")], far())
        await asyncio.sleep(0.05)  # "r" is now running, the queue is empty
        held = [b.submit([(1, 1, i)], far()) for i in range(3)]
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            b.submit([(1, 1, "overflow")], far())
        assert time.monotonic() - t0 < 0.1  # no waiting (a loaded machine may still preempt us briefly)
        run.gate.set()
        await asyncio.gather(running.future, *(h.future for h in held))
    finally:
        await b.close()


async def test_expired_requests_are_dropped_before_running() -> None:
    run = Recorder()
    run.gate.clear()
    b = make(run, max_batch=1, max_wait_s=0.0)
    try:
        running = b.submit([(1, 1, "r")], far())
        await asyncio.sleep(0.05)
        late = b.submit([(1, 1, "late")], time.monotonic() + 0.05)
        ok = b.submit([(1, 1, "ok")], far())
        await asyncio.sleep(0.1)
        run.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert (await ok.future) == ["out:ok"]
        await running.future
        assert all("late" not in batch for batch in run.batches)
    finally:
        await b.close()


async def test_departed_client_is_removed_from_the_queue() -> None:
    run = Recorder()
    run.gate.clear()
    b = make(run, max_batch=1, max_wait_s=0.0)
    try:
        running = b.submit([(1, 1, "r")], far())
        await asyncio.sleep(0.05)
        gone = b.submit([(1, 1, "gone"), (1, 1, "gone")], far())
        stay = b.submit([(1, 1, "stay")], far())
        assert b.queued_rows == 3
        gone.cancel()
        run.gate.set()
        await asyncio.gather(running.future, stay.future)
        assert all("gone" not in batch for batch in run.batches)
    finally:
        await b.close()


async def test_a_failing_batch_fails_only_its_requests() -> None:
    run = Recorder()
    run.gate.clear()
    b = make(run, max_batch=2, max_wait_s=0.0)
    try:
        first = b.submit([(1, 1, "first")], far())
        await asyncio.sleep(0.05)
        # "bad" and "a" share a batch (same length, oldest first); "b" and "c" go in the next one
        bad = b.submit([(1, 10, "bad")], far())
        a = b.submit([(1, 10, "a")], far())
        others = [b.submit([(1, 50, x)], far()) for x in ("b", "c")]
        run.gate.set()
        await first.future
        with pytest.raises(BatchFailed, match="poisoned input"):
            await bad.future
        with pytest.raises(BatchFailed):
            await a.future
        assert [await o.future for o in others] == [["out:b"], ["out:c"]]
    finally:
        await b.close()


async def test_different_keys_never_share_a_batch() -> None:
    run = Recorder()
    b = make(run, max_batch=8, max_wait_s=0.02)
    try:
        jobs = [b.submit([(1, 1, f"{k}{i}")], far(), key=k) for i in range(3) for k in ("x", "y")]
        await asyncio.gather(*(j.future for j in jobs))
        for batch in run.batches:
            assert len({str(d)[0] for d in batch}) == 1, run.batches
    finally:
        await b.close()


async def test_close_fails_queued_work_with_retriable_error() -> None:
    run = Recorder()
    run.gate.clear()
    b = make(run, max_batch=1, max_wait_s=0.0)
    running = b.submit([(1, 1, "r")], far())
    await asyncio.sleep(0.05)
    queued = b.submit([(1, 1, "q")], far())
    await b.close()
    run.gate.set()
    for job in (running, queued):
        with pytest.raises(Exception) as info:
            await job.future
        assert getattr(info.value, "retriable", False)


async def test_request_larger_than_the_queue_is_not_retriable() -> None:
    from xcstack.inference.batcher import RequestTooLarge

    b = make(Recorder(), max_queue=3)
    try:
        with pytest.raises(RequestTooLarge) as info:
            b.submit([(1, 1, i) for i in range(4)], far())
        assert not info.value.retriable
    finally:
        await b.close()


async def test_tiny_text_batches_run_on_the_loop_thread_others_in_the_executor() -> None:
    """inline_tokens: a lone short sentence skips the executor hand-off; big batches and tensor (keyed)
    batches still run in the executor thread, so the loop keeps accepting while they run."""
    threads: list[tuple[int, str]] = []

    def run(batch: list[Item]) -> list[Any]:
        threads.append((len(batch), threading.current_thread().name))
        return [it.data for it in batch]

    b = Batcher("t", run, BatchParams(max_batch=8, max_wait_s=0.0, token_budget=10_000, max_queue=100),
                inline_tokens=64)
    b.start()
    try:
        loop_thread = threading.current_thread().name
        assert (await b.submit([(1, 15, "short")], far()).future) == ["short"]
        assert (await b.submit([(1, 100, "long")], far()).future) == ["long"]  # 100 tokens > 64
        assert (await b.submit([(1, 5, "tensor")], far(), key=("sig",)).future) == ["tensor"]
        assert threads[0] == (1, loop_thread)
        assert threads[1][1] != loop_thread and threads[2][1] != loop_thread
        assert b.inline_runs == 1
    finally:
        await b.close()
