"""A bounded pool of threads for blocking SDK calls (pymilvus), with an acquire timeout.

`size` calls run at once; a caller waits at most `acquire_timeout` for a slot, then gets 503
`vector_pool_exhausted`. A call that outlives `op_timeout` returns 503 to its caller at once; its
thread keeps the slot until the SDK returns (pymilvus calls carry their own deadline), so a stuck
engine can never make the pool grow without bound.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from xcstack.vector import metrics
from xcstack.vector.store import BackendTimeout, PoolExhausted

T = TypeVar("T")


class BlockingPool:
    def __init__(self, name: str, size: int, acquire_timeout: float) -> None:
        self.name = name
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"xc-{name}")
        self._slots = asyncio.Semaphore(size)
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float, **kwargs: Any) -> T:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.acquire_timeout)
        except TimeoutError:
            metrics.POOL_EXHAUSTED.labels(self.name).inc()
            raise PoolExhausted(
                f"all {self.size} {self.name} slots busy for {self.acquire_timeout:g}s", retry_after=1.0
            ) from None
        metrics.POOL_WAIT.labels(self.name).observe(time.perf_counter() - t0)
        self._busy += 1
        metrics.POOL_BUSY.labels(self.name).set(self._busy)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        fut = loop.run_in_executor(self._executor, call)

        def _release(_: Any) -> None:
            self._busy -= 1
            metrics.POOL_BUSY.labels(self.name).set(self._busy)
            self._slots.release()

        fut.add_done_callback(_release)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise BackendTimeout(f"{self.name} operation took longer than {timeout:g}s") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
