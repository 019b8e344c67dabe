"""Per-request deadlines and client-disconnect detection, both delivered the same way: a reason is
recorded and the request's task is cancelled; the request code catches CancelledError, asks
`Watchdog.take()` for the reason and stops the relay explicitly.

Why not rely on cancellation alone: under uvloop a relay whose upstream keeps delivering data may
never suspend (reads return buffered data; ASGI `send` to a gone client returns at once), so the
relay also checks `watchdog.reason` per chunk (see FIELD-NOTES "Disconnect under uvloop").

The disconnect loop itself is `xcstack.disconnect.wait_disconnect`, shared with the other capabilities
(whose plain handlers use `CancelOnDisconnect` from the same module).

Its state changes only through its methods (`disarm`, `relaying`, `waiting_upstream`, ...): the order
of those changes is the protocol, and a field set from outside would skip it.
"""

from __future__ import annotations

import asyncio

from xcstack.disconnect import wait_disconnect
from xcstack.gateway.types import Receive


class Watchdog:
    __slots__ = (
        "_armed",
        "_busy",
        "_delivered",
        "_handle",
        "_idle",
        "_late_disconnect",
        "_loop",
        "_phase_at",
        "_phase_reason",
        "_reason",
        "_requested",
        "_task",
        "_total_at",
        "_watcher",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._reason: str | None = None
        self._armed = True
        self._requested = False
        self._delivered = False
        self._handle: asyncio.TimerHandle | None = None
        self._total_at = float("inf")
        self._phase_at = float("inf")
        self._phase_reason = ""
        self._idle = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._late_disconnect = False
        self._busy = False  # True while the relay is not waiting on the upstream (idle is paused)

    @property
    def reason(self) -> str | None:
        """Why the request is being stopped ("total", "ttfb", "idle", "disconnect"), or None."""
        return self._reason

    def disarm(self) -> None:
        """The answer is being sent: from now on nothing cancels the request (a late deadline or
        disconnect must not cut a response that is already decided)."""
        self._armed = False

    # -- deadlines ------------------------------------------------------------------------------
    def set_total(self, seconds: float) -> None:
        self._total_at = self._loop.time() + seconds
        self._schedule()

    def set_phase(self, seconds: float, reason: str) -> None:
        """One phase deadline at a time (ttfb, then idle gaps); `touch` moves an idle deadline."""
        self._phase_at = self._loop.time() + seconds
        self._phase_reason = reason
        self._idle = seconds if reason == "idle" else 0.0
        self._schedule()

    def clear_phase(self) -> None:
        self._phase_at = float("inf")

    def touch(self) -> None:
        """Activity: push the idle deadline (cheap: the timer re-arms itself lazily)."""
        if self._idle:
            self._phase_at = self._loop.time() + self._idle

    def waiting_upstream(self) -> None:
        """About to wait for the upstream: the idle gap starts now."""
        self._busy = False
        if self._idle:
            self._phase_at = self._loop.time() + self._idle

    def relaying(self) -> None:
        """Data came: relaying it (maybe to a slow client) is not an idle upstream, so the idle
        deadline is paused until `waiting_upstream`."""
        self._busy = True

    def _schedule(self) -> None:
        at = min(self._total_at, self._phase_at)
        if self._handle is not None:
            if self._handle.when() <= at:
                return  # fires earlier; it will re-arm itself
            self._handle.cancel()
        if at != float("inf"):
            self._handle = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        now = self._loop.time()
        if now >= self._total_at:
            self.fire("total")
        elif now >= self._phase_at:
            if self._busy and self._idle:  # relaying to the client, not waiting on the upstream
                self._phase_at = now + self._idle
                self._schedule()
            else:
                self.fire(self._phase_reason)
        else:
            self._schedule()

    # -- client disconnect ------------------------------------------------------------------------
    def watch_client(self, receive: Receive) -> None:
        """Start watching ASGI `receive` for `http.disconnect` (call after the body was read)."""
        self._watcher = self._loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        await wait_disconnect(receive)
        self.fire("disconnect")

    # -- delivery ---------------------------------------------------------------------------------
    def fire(self, reason: str) -> None:
        if not self._armed:
            return
        if self._reason is not None:
            if reason == "disconnect":
                self._late_disconnect = True  # re-fired by reset() if the first reason is forgiven
            return
        self._reason = reason
        self._requested = True
        self._task.cancel()

    def take(self) -> str | None:
        """Called in `except CancelledError`: the reason if the cancel was ours (then it is
        absorbed), else None (re-raise: someone else is cancelling the request)."""
        if self._requested and not self._delivered:
            self._delivered = True
            self._task.uncancel()
            return self._reason
        return None

    def reset(self) -> None:
        """Forget a delivered phase reason (after a ttfb timeout handled by failover)."""
        self._reason = None
        self._requested = False
        self._delivered = False
        if self._late_disconnect:
            self._late_disconnect = False
            self.fire("disconnect")

    async def settle(self) -> None:
        """After the relay saw `reason` by the flag: take delivery of the pending cancel now."""
        if self._requested and not self._delivered:
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                self._delivered = True
                self._task.uncancel()

    async def close(self) -> None:
        """Disarm; absorb a cancel that was requested but not delivered yet, so it cannot hit
        the server's code after the request returned."""
        self._armed = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self.settle()
