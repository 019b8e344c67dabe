"""Event-loop lag monitor: the proof that nothing blocks the loop.

A ticker sleeps `interval` seconds and measures how late it woke up; the lateness goes into the
`xc_event_loop_lag_seconds` histogram. A blocking call of 100 ms shows up as ~100 ms of lag.
"""

from __future__ import annotations

import asyncio
import collections
import time

from xcstack.aio import cancel_and_wait
from xcstack.observability.metrics import LOOP_LAG


class LoopLagMonitor:
    def __init__(self, interval: float = 0.05, keep: int = 2048) -> None:
        self.interval = interval
        self.samples: collections.deque[float] = collections.deque(maxlen=keep)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xc-loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    async def _run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock has 1 ms resolution, too coarse for lag.
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - start - self.interval)
            self.samples.append(lag)
            LOOP_LAG.observe(lag)

    def percentile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
