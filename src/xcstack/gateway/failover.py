"""Routing with failover: one request tried on the model's upstreams in turn until one answers.

A connect error, timeout, 429 or 5xx before the first byte is retried on the next candidate (bounded
attempts, jittered backoff); an upstream's own 4xx is its answer (relayed, not retried). What comes
back is `Opened`, with the upstream's slot held until `finish` records how the call went (breaker,
metrics) and gives the slot back.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from xcstack.errors import CoreCode, GatewayTimeout, Overloaded, UpstreamError, XCError
from xcstack.gateway import metrics
from xcstack.gateway.admission import GateFull, GateTimeout
from xcstack.gateway.prepare import EMBEDDINGS, Prepared, upstream_body
from xcstack.gateway.protocol import GatewayCode
from xcstack.gateway.settings import RetrySettings
from xcstack.gateway.upstream import Router, Target, Upstream
from xcstack.gateway.watchdog import Watchdog
from xcstack.httputil import dumps, loads

MAX_UNARY_BYTES = 64 * 1024 * 1024  # a non-streamed answer is buffered whole


@dataclass(slots=True)
class Opened:
    """An upstream answer that is being relayed: the slot is held until `finish`."""

    upstream: Upstream
    resp: aiohttp.ClientResponse | None
    status: int
    first: bytes  # streams: the first chunk; unary: the whole body
    sent_at: float = 0.0  # monotonic time the request went to this upstream


class UpstreamFailed(Exception):
    """One attempt failed in a way the next candidate may not (the error is the answer if none is left)."""

    def __init__(self, error: XCError) -> None:
        super().__init__(error.message)
        self.error = error


class Stopped(Exception):
    """The watchdog stopped the call: `reason` is "total" (deadline) or "disconnect" (client gone)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Failover:
    def __init__(self, router: Router, retry: RetrySettings) -> None:
        self.router = router
        self.retry = retry

    async def open(self, pr: Prepared, wd: Watchdog) -> Opened:
        """Send the request to the best candidate; on connect error, timeout, 5xx or 429 before
        the first byte, retry on the next one (bounded, jittered backoff). Returns with the
        upstream's slot held (release with `finish`)."""
        candidates = self.router.candidates(pr.model, pr.endpoint is EMBEDDINGS)
        last: XCError | None = None
        retry_after = 0.0
        tried = 0
        for target in candidates:
            if tried >= self.retry.max_attempts:
                break
            up = target.upstream
            if not up.breaker.begin():
                up.outcome("breaker_open")
                retry_after = max(retry_after, up.breaker.retry_after())
                if last is None:
                    last = Overloaded(f"upstream {up.name} is unavailable (circuit open)",
                                      code=GatewayCode.UPSTREAM_UNAVAILABLE)
                continue
            if tried:
                base = self.retry.backoff_base_s * (2 ** (tried - 1))
                await asyncio.sleep(min(self.retry.backoff_max_s, base) * (0.5 + random.random()))
            tried += 1
            try:
                await up.gate.acquire()
            except (GateFull, GateTimeout):
                up.breaker.neutral()
                up.outcome("gate_full")
                metrics.rejected("upstream_full")
                last = Overloaded(f"upstream {up.name} is at its concurrency limit", code=CoreCode.OVERLOADED)
                continue
            up.m_in_flight.inc()
            opened: Opened | None = None
            try:
                opened = await self._attempt(pr, target, wd)
                return opened
            except UpstreamFailed as exc:
                last = exc.error
                if "Retry-After" in exc.error.headers:
                    retry_after = max(retry_after, float(exc.error.headers["Retry-After"]))
                continue
            finally:
                if opened is None:
                    up.gate.release()
                    up.m_in_flight.dec()
        if last is None:
            last = Overloaded(f"no upstream available for model {pr.model!r}", code=GatewayCode.UPSTREAM_UNAVAILABLE)
        if isinstance(last, Overloaded):
            last.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        raise last

    async def _attempt(self, pr: Prepared, target: Target, wd: Watchdog) -> Opened:
        up = target.upstream
        assert up.session is not None
        tmo = up.timeouts
        resp: aiohttp.ClientResponse | None = None
        ok = False
        try:
            wd.set_phase(tmo.ttfb_s, "ttfb")
            headers = up.headers if pr.request_id is None else {**up.headers, "X-Request-Id": pr.request_id}
            sent_at = time.monotonic()
            resp = await up.post(up.url(pr.endpoint.upstream_path), data=upstream_body(pr, target),
                                 headers=headers)  # retried when a pooled connection was stale
            status = resp.status
            if status >= 500 or status == 429:
                body = await resp.content.read(64 * 1024)
                if status == 429:
                    up.breaker.neutral()
                    up.outcome("429")
                    ra = retry_after_header(resp.headers.get("Retry-After"))
                    raise UpstreamFailed(Overloaded(f"upstream {up.name} is rate limiting (429)",
                                                    code=GatewayCode.UPSTREAM_UNAVAILABLE, retry_after=ra))
                up.breaker.failure()
                up.outcome("5xx")
                if status == 503:  # unavailable for now (a llama.cpp worker loading its model): retriable
                    raise UpstreamFailed(Overloaded(
                        f"upstream {up.name} is unavailable (503): {snippet(body)}",
                        code=GatewayCode.UPSTREAM_UNAVAILABLE,
                        retry_after=retry_after_header(resp.headers.get("Retry-After"))))
                raise UpstreamFailed(UpstreamError(
                    f"upstream {up.name} answered {status}: {snippet(body)}", code=CoreCode.UPSTREAM_ERROR))
            if status >= 400:
                # The upstream refused the request itself: not retriable, relay its status and message in
                # the gateway's error model (vLLM, TGI and OpenAI each shape theirs differently)
                body = rejection_body(up.name, status, await resp.content.read(64 * 1024))
                up.breaker.neutral()
                up.outcome("4xx")
                wd.clear_phase()
                ok = True
                return Opened(up, resp, status, body, sent_at)
            if pr.stream:
                first = await resp.content.readany()
                if not first:
                    up.breaker.failure()
                    up.outcome("empty")
                    raise UpstreamFailed(UpstreamError(f"upstream {up.name} closed the stream before any data",
                                                       code=CoreCode.UPSTREAM_ERROR))
            else:
                wd.clear_phase()
                first = await _read_capped(up, resp)
            ok = True
            return Opened(up, resp, status, first, sent_at)
        except (aiohttp.ClientError, OSError) as exc:
            up.breaker.failure()
            up.outcome("connect_error" if isinstance(exc, aiohttp.ClientConnectionError | OSError) else "error")
            raise UpstreamFailed(Overloaded(f"upstream {up.name} failed: {type(exc).__name__}: {exc}"[:300],
                                            code=GatewayCode.UPSTREAM_UNAVAILABLE)) from None
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            if reason == "ttfb":
                wd.reset()
                up.breaker.failure()
                up.outcome("ttfb_timeout")
                raise UpstreamFailed(GatewayTimeout(
                    f"upstream {up.name} sent nothing within {tmo.ttfb_s}s", code=CoreCode.UPSTREAM_TIMEOUT)) from None
            up.breaker.neutral()
            raise Stopped(reason) from None  # total timeout or disconnect: the caller handles it
        finally:
            if not ok:
                wd.clear_phase()
                if resp is not None:
                    resp.close()

    def finish(self, opened: Opened, healthy: bool | None) -> None:
        """The call is over: `healthy` True (success), False (failed mid-stream) or None (no verdict
        on the upstream: a disconnect, a total deadline); the upstream's slot is given back."""
        up = opened.upstream
        if opened.resp is not None:
            if healthy is True:
                opened.resp.release()  # back to the keep-alive pool (closed if not at EOF)
            else:
                opened.resp.close()
        if healthy is True:
            up.breaker.success()
            up.outcome("ok")
        elif healthy is False:
            up.breaker.failure()
            up.outcome("failed_mid_stream")
        else:
            up.breaker.neutral()
        up.gate.release()
        up.m_in_flight.dec()


async def _read_capped(up: Upstream, resp: aiohttp.ClientResponse) -> bytes:
    """A non-streamed answer, whole, at most MAX_UNARY_BYTES."""
    if resp.content_length is not None and resp.content_length > MAX_UNARY_BYTES:
        up.breaker.neutral()
        raise UpstreamFailed(UpstreamError(f"upstream {up.name} answer is too large", code=CoreCode.UPSTREAM_ERROR))
    if resp.content_length is not None:
        return await resp.read()
    parts: list[bytes] = []  # chunked: read with a cap
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > MAX_UNARY_BYTES:
            up.breaker.neutral()
            raise UpstreamFailed(UpstreamError(f"upstream {up.name} answer is too large", code=CoreCode.UPSTREAM_ERROR))
        parts.append(chunk)
    return b"".join(parts)


def rejection_body(upstream: str, status: int, body: bytes) -> bytes:
    """An upstream's own 4xx answer as `{"error": {type, code, message, param}}`: OpenAI-style bodies keep
    their message, type and param; vLLM's flat `{"object": "error", "message", "type"}` and plain text too."""
    try:
        raw = loads(body)
    except ValueError:
        raw = None
    inner = raw.get("error") if isinstance(raw, dict) else None
    src = inner if isinstance(inner, dict) else raw if isinstance(raw, dict) else {}
    message = src.get("message") if isinstance(src.get("message"), str) else (
        inner if isinstance(inner, str) else snippet(body) or f"upstream {upstream} answered {status}")
    etype = src.get("type")
    err: dict[str, Any] = {"type": etype[:64] if isinstance(etype, str) else "invalid_request_error",
                           "code": GatewayCode.UPSTREAM_REJECTED, "message": str(message)[:4096]}
    param = src.get("param")
    if isinstance(param, str):
        err["param"] = param[:256]
    if _context_exceeded(src, str(message)):  # OpenAI's shape, whatever the server said it in
        err.update(type="invalid_request_error", code=GatewayCode.CONTEXT_LENGTH_EXCEEDED)
        err.setdefault("param", "messages")
    return dumps({"error": err})


def _context_exceeded(src: dict[str, Any], message: str) -> bool:
    """A prompt longer than the model's context: llama.cpp's `exceed_context_size_error`, OpenAI's
    `context_length_exceeded`, vLLM's "maximum context length" message."""
    return (src.get("type") == "exceed_context_size_error" or src.get("code") == "context_length_exceeded"
            or "maximum context length" in message)


def snippet(body: bytes) -> str:
    """The start of an upstream's body for an error message (one line)."""
    return body[:200].decode("utf-8", "replace").replace("\n", " ")


def retry_after_header(value: str | None) -> float:
    """An upstream's Retry-After seconds, clamped to 1..3600 (1 when absent or not a number)."""
    try:
        return max(1.0, min(3600.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0
