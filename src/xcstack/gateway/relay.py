"""The SSE streaming relay: an opened upstream stream forwarded to the ASGI client event by event.

It owns the I/O and the clock, not the format (`sse.EventStream` frames events): the response start,
sends sliced so a slow client holds at most a slice in the server (the server's `send` waits for the
client: backpressure), the idle deadline paused while the client is the slow side, the per-chunk check
for a client that left (under uvloop a busy relay may never see its cancel: FIELD-NOTES "Disconnect
under uvloop"), and the ending: `[DONE]`, or an error event then `[DONE]` when the upstream failed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from xcstack.errors import BadRequest, CoreCode, GatewayTimeout, UpstreamError, XCError
from xcstack.gateway import metrics
from xcstack.gateway.accounting import Accounting
from xcstack.gateway.failover import Failover, Opened
from xcstack.gateway.prepare import Prepared
from xcstack.gateway.protocol import GatewayCode
from xcstack.gateway.settings import GatewaySettings
from xcstack.gateway.sse import EventStream, EventTooLarge, error_tail
from xcstack.gateway.types import Send
from xcstack.gateway.watchdog import Watchdog
from xcstack.httputil import dumps

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
SEND_SLICE = 16 * 1024


class Relay:
    def __init__(self, failover: Failover, accounting: Accounting, settings: GatewaySettings) -> None:
        self.failover = failover
        self.accounting = accounting
        self.settings = settings  # read per stream: `max_sse_event_bytes`

    async def run(self, pr: Prepared, opened: Opened, send: Send, wd: Watchdog, t0: float) -> int:
        """Relay `opened` (a 2xx stream) to the client; returns the status to log (499: client gone).
        The upstream's slot is given back (`Failover.finish`) on every path."""
        up = opened.upstream
        resp = opened.resp
        assert resp is not None
        t_first = time.monotonic()
        self.accounting.first_token(pr, t_first - t0)
        wd.set_phase(up.timeouts.idle_s, "idle")
        max_event = self.settings.max_sse_event_bytes
        events = EventStream(max_event, pr.client_usage)
        healthy: bool | None = None
        error: XCError | None = None
        status = 200
        content = resp.content
        # content safety (the safety capability): output filters over the events, and the label
        safety = pr.safety
        if safety is not None:
            try:  # signed while the upstream worked on its first event: ready now, or nearly
                await safety.label_ready()
            except BaseException:
                self.failover.finish(opened, None)
                raise
        flt = safety.stream() if safety is not None else None
        headers = SSE_HEADERS if safety is None else SSE_HEADERS + [
            (k.encode(), v.encode()) for k, v in safety.headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            chunk = opened.first
            while True:
                try:
                    out = events.feed(chunk)
                except EventTooLarge:
                    error = UpstreamError(f"upstream sent an SSE event over {max_event} bytes",
                                          code=GatewayCode.STREAM_INTERRUPTED)
                    healthy = False
                    break
                if flt is not None and out:
                    out = flt.feed(out)
                    await safety.record(flt)
                    if flt.blocked is not None:  # end with the error event; the upstream is closed
                        error = _blocked(flt.blocked)
                        break
                if out:
                    await _send_sliced(send, out, wd)
                if wd.reason is not None:  # client gone (or deadline) while data kept flowing
                    break
                if events.done:
                    healthy = True
                    break
                wd.waiting_upstream()  # the idle gap counts only while waiting for the upstream
                chunk = await content.readany()
                wd.relaying()  # relaying (maybe to a slow client): the idle deadline does not apply
                if not chunk:
                    out = events.end()
                    if flt is not None:
                        out = flt.feed(out) + flt.end()
                        await safety.record(flt)
                        if flt.blocked is not None:
                            error = _blocked(flt.blocked)
                            break
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    if events.done:
                        healthy = True
                    else:
                        healthy = False
                        error = UpstreamError(f"upstream {up.name} ended the stream without [DONE]",
                                              code=GatewayCode.STREAM_INTERRUPTED)
                    break
        except asyncio.CancelledError:
            if wd.take() is None:
                self.failover.finish(opened, None)
                raise
        except (aiohttp.ClientError, OSError) as exc:
            healthy = False
            error = UpstreamError(f"upstream {up.name} failed mid-stream: {type(exc).__name__}",
                                  code=GatewayCode.STREAM_INTERRUPTED)
        reason = wd.reason
        if reason is not None:
            await wd.settle()
        if reason == "disconnect":
            self.failover.finish(opened, None)  # closes the upstream connection now
            metrics.DISCONNECTS.labels(pr.endpoint.label).inc()
            status = 499
        else:
            if reason in ("idle", "total"):
                healthy = False if reason == "idle" else None
                what = f"no data for {up.timeouts.idle_s}s" if reason == "idle" else "total time limit reached"
                error = GatewayTimeout(f"upstream {up.name}: {what}", code=CoreCode.UPSTREAM_TIMEOUT)
            self.failover.finish(opened, healthy)
            wd.disarm()
            if error is not None:
                metrics.STREAM_ERRORS.labels(error.code).inc()
                tail = error_tail(dumps(error.body()))
                status = 200 if healthy is None else 502
            else:
                tail = b""
            try:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            except OSError:
                pass
        await self.accounting.stream(pr, events.usage, events.events, time.monotonic() - t_first)
        return status


def _blocked(finding: Any) -> XCError:
    return BadRequest(f"answer blocked by policy {finding.policy!r}: category {finding.category}",
                      code=GatewayCode.CONTENT_BLOCKED)


async def _send_sliced(send: Send, out: bytes, wd: Watchdog) -> None:
    """Send relayed events; a large batch in slices, so the server waits for the client between them
    (memory per stream stays bounded) and a client that left is noticed between slices."""
    if len(out) <= SEND_SLICE:
        await send({"type": "http.response.body", "body": out, "more_body": True})
        return
    for i in range(0, len(out), SEND_SLICE):
        await send({"type": "http.response.body", "body": out[i:i + SEND_SLICE], "more_body": True})
        if wd.reason is not None:
            break
