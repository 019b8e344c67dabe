"""Admission control: concurrency gates with a bounded wait queue, and circuit breakers.

A `Gate` admits up to `limit` holders; up to `max_queue` more wait (FIFO) at most `timeout_s`;
beyond that `acquire` fails at once with `GateFull`, after the wait with `GateTimeout`. A slot
handed to a waiter that was cancelled meanwhile is passed on, so slots never leak.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class GateFull(Exception):
    """No slot and the wait queue is full."""


class GateTimeout(Exception):
    """Waited the whole timeout without getting a slot."""


class Gate:
    __slots__ = ("_waiters", "active", "limit", "max_queue", "name", "timeout_s")

    def __init__(self, name: str, limit: int, max_queue: int, timeout_s: float) -> None:
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue or self.timeout_s <= 0:
            raise GateFull(self.name)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.timeout_s):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # granted at the last instant: keep it
            raise GateTimeout(self.name) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, but our caller went away: pass it on
            raise
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1
        if self.active < 0:  # pragma: no cover - would be a bug
            self.active = 0
            raise RuntimeError(f"gate {self.name}: released more than acquired")


class Breaker:
    """Per-upstream circuit breaker: closed → open after `threshold` consecutive failures →
    half-open after `open_s` (one probe at a time) → closed on success, open again on failure."""

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2
    __slots__ = ("failures", "open_s", "opened_at", "probing", "state", "threshold")

    def __init__(self, threshold: int, open_s: float) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def available(self, now: float | None = None) -> bool:
        """May a request be sent now? (Does not reserve the probe; see `begin`.)"""
        if self.state == self.CLOSED:
            return True
        now = time.monotonic() if now is None else now
        if self.state == self.OPEN:
            return now - self.opened_at >= self.open_s
        return not self.probing

    def begin(self) -> bool:
        """Reserve the right to send; False when the breaker refuses. Pair with success/failure."""
        if self.state == self.CLOSED:
            return True
        now = time.monotonic()
        if self.state == self.OPEN:
            if now - self.opened_at < self.open_s:
                return False
            self.state = self.HALF_OPEN
            self.probing = False
        if self.probing:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.probing = False
        self.state = self.CLOSED

    def failure(self) -> None:
        self.probing = False
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.threshold:
            self.state = self.OPEN
            self.opened_at = time.monotonic()

    def neutral(self) -> None:
        """The attempt ended without telling anything about health (client left, 4xx)."""
        self.probing = False

    def retry_after(self) -> float:
        if self.state != self.OPEN:
            return 1.0
        return max(1.0, self.open_s - (time.monotonic() - self.opened_at))

    @property
    def state_name(self) -> str:
        return ("closed", "open", "half_open")[self.state]
