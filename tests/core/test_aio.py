"""cancel_and_wait: background loops that lose a cancel (Python 3.11 wait_for) still stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from xcstack.aio import cancel_and_wait


async def _swallows_cancels(times: int, ticks: list[int]) -> None:
    """A loop like a health checker whose first `times` cancels are lost (as wait_for loses them)."""
    lost = 0
    while True:
        try:
            await asyncio.sleep(0.01)
            ticks.append(1)
        except asyncio.CancelledError:
            if lost >= times:
                raise
            lost += 1
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


async def test_a_loop_that_swallowed_a_cancel_is_stopped() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(_swallows_cancels(2, ticks))
    await asyncio.sleep(0.03)
    # the plain pattern hangs: one cancel, then await -> the loop runs on
    task_plain = asyncio.create_task(_swallows_cancels(1, []))
    await asyncio.sleep(0.02)
    task_plain.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task_plain), 0.2)
    assert await cancel_and_wait([task, task_plain, None], timeout=5) is True
    assert task.cancelled() and task_plain.cancelled()
    n = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == n  # really stopped


async def test_a_task_that_never_stops_is_reported_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn(), name="stubborn-loop")
    await asyncio.sleep(0.02)  # running (a task cancelled before its first step just ends)
    caplog.set_level(logging.WARNING, logger="xcstack.aio")
    t0 = asyncio.get_running_loop().time()
    assert await cancel_and_wait([task], timeout=0.5) is False
    assert asyncio.get_running_loop().time() - t0 < 2
    assert "stubborn-loop" in caplog.text
    stop.set()
    await task


async def test_failed_and_finished_tasks_are_fine() -> None:
    async def boom() -> None:
        raise RuntimeError("x")

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(boom())
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([done, failed]) is True
