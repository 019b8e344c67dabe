"""Watchdog: deadlines and disconnects delivered as one cancel with a reason, never leaking out."""

from __future__ import annotations

import asyncio

from xcstack.gateway.watchdog import Watchdog


async def test_idle_deadline_moves_with_activity_and_fires_with_reason() -> None:
    async def body() -> str:
        wd = Watchdog()
        wd.set_phase(0.05, "idle")
        try:
            for _ in range(5):  # activity every 30 ms keeps the 50 ms idle deadline away
                await asyncio.sleep(0.03)
                wd.touch()
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            reason = wd.take()
            assert reason is not None
            return reason
        finally:
            await wd.close()
        return "none"

    assert await asyncio.create_task(body()) == "idle"


async def test_disconnect_during_a_forgiven_ttfb_is_not_lost() -> None:
    async def body() -> list[str]:
        wd = Watchdog()
        got: list[str] = []
        wd.set_phase(0.01, "ttfb")
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            got.append(wd.take() or "?")
            wd.fire("disconnect")  # arrives while the ttfb reason is being handled
            wd.reset()  # failover forgives the ttfb...
        try:
            await asyncio.sleep(1)  # ...but the disconnect still stops the request
        except asyncio.CancelledError:
            got.append(wd.take() or "?")
        await wd.close()
        return got

    assert await asyncio.create_task(body()) == ["ttfb", "disconnect"]


async def test_undelivered_cancel_is_absorbed_on_close() -> None:
    async def body() -> str:
        wd = Watchdog()
        wd.fire("disconnect")  # requested, but the task never awaits before close
        await wd.close()
        await asyncio.sleep(0)  # would raise CancelledError if the cancel leaked
        return "ok"

    assert await asyncio.create_task(body()) == "ok"


async def test_foreign_cancel_is_not_swallowed() -> None:
    started = asyncio.Event()

    async def body() -> None:
        wd = Watchdog()
        started.set()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            assert wd.take() is None  # not ours: re-raise
            raise
        finally:
            await wd.close()

    t = asyncio.create_task(body())
    await started.wait()
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        pass
    assert t.cancelled()
