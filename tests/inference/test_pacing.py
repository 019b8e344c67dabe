"""LoopPacer: a burst of request work is spread over loop iterations (bounded work per iteration)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from xcstack.inference.pacing import LoopPacer


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class IterationClock:
    """Counts loop iterations: a callback that re-schedules itself runs once per iteration."""

    def __init__(self) -> None:
        self.n = 0
        self._on = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        if self._on:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._on = False


async def _burst(pacer: LoopPacer | None, n: int, work_s: float) -> tuple[list[int], list[int]]:
    clock = IterationClock()
    gate = asyncio.Event()
    iterations: list[int] = []
    order: list[int] = []

    async def request(i: int) -> None:
        await gate.wait()  # all n become ready in the same iteration, like replies of one batch
        if pacer is not None:
            await pacer.turn()
        iterations.append(clock.n)
        order.append(i)
        _spin(work_s)  # encoding + middleware + send of one response

    tasks = [asyncio.create_task(request(i)) for i in range(n)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    clock.stop()
    return iterations, order


def _per_iteration(iterations: list[int]) -> int:
    return max(iterations.count(i) for i in set(iterations))


async def test_burst_without_pacing_runs_in_one_iteration() -> None:
    iterations, _ = await _burst(None, 30, 0.0002)
    assert _per_iteration(iterations) == 30  # the problem: 30 x the work before any timer can run


async def test_burst_is_spread_over_iterations_in_fifo_order() -> None:
    pacer = LoopPacer(budget_s=0.001)
    iterations, order = await _burst(pacer, 30, 0.0004)
    # 1 ms budget, 0.4 ms pieces: at most 3 pieces start in one window (a slow, preempted machine only
    # lowers that), then one per iteration
    assert _per_iteration(iterations) <= 3, iterations
    assert len(set(iterations)) >= 10
    assert order == sorted(order)  # FIFO: no request overtakes another
    assert pacer.deferred >= 20 and pacer.waiting == 0


async def test_small_bursts_are_not_delayed() -> None:
    pacer = LoopPacer(budget_s=0.005)
    iterations, _ = await _burst(pacer, 4, 0.0001)
    assert len(set(iterations)) == 1 and pacer.deferred == 0  # within the budget: same iteration, no waiting


async def test_a_cancelled_waiter_does_not_stall_the_others() -> None:
    pacer = LoopPacer(budget_s=0.0)  # one per iteration: the first goes on, the others queue
    done: list[int] = []

    async def req(i: int) -> None:
        await pacer.turn()
        done.append(i)

    tasks = [asyncio.create_task(req(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert done == [0] and pacer.waiting == 4
    tasks[1].cancel()
    tasks[3].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert done == [0, 2, 4]
    assert isinstance(results[1], asyncio.CancelledError) and pacer.waiting == 0


async def test_loop_lag_of_a_burst_is_bounded_by_the_budget() -> None:
    """What the lag monitor sees: a 10 ms timer during a burst of 30 x 0.5 ms pieces of work."""

    async def late_by(pacer: LoopPacer | None) -> float:
        gate = asyncio.Event()

        async def request() -> None:
            await gate.wait()
            if pacer is not None:
                await pacer.turn()
            _spin(0.0005)

        tasks = [asyncio.create_task(request()) for _ in range(30)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        timer = asyncio.create_task(asyncio.sleep(0.001))
        gate.set()
        await timer
        lag = time.perf_counter() - t0 - 0.001
        await asyncio.gather(*tasks)
        return lag

    unpaced = await late_by(None)
    paced = await late_by(LoopPacer(budget_s=0.001))
    assert unpaced >= 0.014  # all 30 pieces ran before the timer
    assert paced < unpaced / 2, (paced, unpaced)


def test_budget_zero_disables_pacing(tmp_path: Path) -> None:
    from xcstack.config import load_settings
    from xcstack.inference.capability import InferenceCapability

    on = InferenceCapability(load_settings(data_dir=tmp_path, inference={"mode": "inline"}))
    assert on.pacer is not None and on.pacer.budget_s == pytest.approx(0.001)
    off = InferenceCapability(load_settings(data_dir=tmp_path, inference={"mode": "inline", "loop_budget_ms": 0}))
    assert off.pacer is None
    with pytest.raises(Exception, match="loop_budget_ms"):
        load_settings(data_dir=tmp_path, inference={"loop_budget_ms": -1})
