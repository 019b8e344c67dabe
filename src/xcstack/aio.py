"""Small asyncio helpers shared by the capabilities.

`cancel_and_wait` exists because one `task.cancel()` is not enough on Python 3.11: when the
cancel lands while an inner `asyncio.wait_for` has just completed, `wait_for` returns the result
and the cancellation is lost (fixed in 3.12, gh-86296). A background loop that was cancelled
that way runs on, and `await task` at shutdown waits for ever (seen in CI: a Milvus health loop
held a test teardown for 300 s). So shutdown cancels again until the task is really done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None], timeout: float = 10.0) -> bool:
    """Cancel `tasks` and wait until each is done, re-cancelling any that swallowed the cancel.

    Returns True when all finished; after `timeout` seconds logs the stragglers and returns False
    (shutdown goes on rather than hang). Results and exceptions of the tasks are discarded.
    """
    all_tasks = [t for t in tasks if t is not None]
    pending = {t for t in all_tasks if not t.done()}
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(sorted(_name(t) for t in pending))
            log.warning("tasks still running %gs after cancel: %s", timeout, names)
            return False
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.2, left))
    for t in all_tasks:
        if not t.cancelled():
            t.exception()  # mark retrieved: no "exception was never retrieved" noise at exit
    return True


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
