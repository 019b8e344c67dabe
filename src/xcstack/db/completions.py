"""Results from worker threads back to the event loop, many per wake-up.

A loop wake-up from another thread (`call_soon_threadsafe`) costs tens of microseconds on a VM (more
across vCPUs); under load many results finish close together, so they queue here and the loop runs
them all in one callback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("xcstack.db")


class Completions:
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
