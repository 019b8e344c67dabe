"""Client-disconnect detection for ASGI handlers that wait on queued work.

Neither uvicorn nor Granian cancels a plain handler when its client goes away. Both deliver
`{"type": "http.disconnect"}` on ASGI `receive` instead: once the request body has been read, the next
`receive()` waits until the connection closes (checked for both servers, FIN and RST, asyncio and uvloop).
So a handler that waits for queued work (a batch slot, an upstream answer) and wants that work withdrawn
when the client leaves watches `receive` in a small task. On `http.disconnect` the watcher cancels the
handler's task. The cancellation runs the waited-on code's own cleanup: the batcher's `Job.cancel` removes
the queued rows, and the IPC client sends a CANCEL frame to the model worker. On the way out the cancel
is absorbed and turned into `ClientDisconnected`:

    try:
        async with CancelOnDisconnect(request.receive):
            result = await work()
    except ClientDisconnected:
        return DepartedResponse()   # sends nothing; outer layers record 499

`wait_disconnect` is the bare loop, also used by the gateway's `Watchdog` (which adds deadlines and
delivers its reasons itself).

Cost: one task per request, parked in `receive()`; it is cancelled, not awaited, on exit (see
`tests/inference/test_disconnect.py::test_watch_costs_one_small_task` for the measured cost).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("xcstack.disconnect")

#: Set in the ASGI scope when a handler gave up because its client left and sent nothing on purpose;
#: the observability and audit middleware then record 499 (nginx's convention) instead of 500.
SCOPE_FLAG = "xc.client_disconnected"


class ClientDisconnected(Exception):
    """The client went away while the request was being served."""


async def wait_disconnect(receive: Receive) -> None:
    """Return once `receive` yields `http.disconnect`. Call it only after the request body was read:
    it consumes (and drops) any further `http.request` messages."""
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            return


class CancelOnDisconnect:
    """Async context manager: while its block runs, a client disconnect cancels the current task; the
    block's CancelledError then leaves the manager as `ClientDisconnected`.

    - Another party's cancel (server shutdown) is never swallowed: it propagates as CancelledError.
    - When the disconnect coincides with the block's end (the cancel was requested but not delivered,
      or code inside the block swallowed it), the pending cancel is absorbed here and the block's
      outcome is replaced by `ClientDisconnected`: nobody is left to read it.
    - `gone` says whether the client left (also readable inside the block).
    """

    __slots__ = ("_fired", "_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._fired = False
        self.gone = False

    async def __aenter__(self) -> CancelOnDisconnect:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task under an ASGI server
            raise RuntimeError("CancelOnDisconnect needs a running task")
        self._task = task
        self._watcher = task.get_loop().create_task(self._watch())
        return self

    async def _watch(self) -> None:
        try:
            await wait_disconnect(self._receive)
        except Exception as exc:  # a server that raises instead of answering: stop watching, quietly
            log.debug("receive() failed while watching for a disconnect: %r", exc)
            return
        self.gone = True
        task = self._task
        if task is not None and not task.done():
            self._fired = True
            task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        watcher = self._watcher
        self._watcher = None
        if watcher is not None and not watcher.done():
            watcher.cancel()  # parked in receive(): it goes at the next loop turn, nothing to await
        if not self._fired:
            return False
        task = self._task
        assert task is not None
        if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
            # the block ended while our cancel was pending (or something inside swallowed it): take it now
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass
        if task.uncancel() > 0:
            raise asyncio.CancelledError  # someone else is cancelling this request too
        raise ClientDisconnected("the client disconnected") from None


class DepartedResponse(Response):
    """What a Starlette endpoint returns for a client that is gone: nothing is sent (both servers accept
    an app that returns without a response once they saw the disconnect); the scope flag makes the
    observability and audit middleware record 499."""

    def __init__(self) -> None:  # no Response.__init__: no body, no headers to build
        self.status_code = 499
        self.background = None
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SCOPE_FLAG] = True
