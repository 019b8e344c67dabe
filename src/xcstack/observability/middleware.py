"""The outermost ASGI middleware: request id, access log, metrics, in-flight count, request limits.

Pure ASGI (no BaseHTTPMiddleware) so it adds little per request and never buffers a stream.

Limits enforced here, identically under Granian and uvicorn (the servers' own limits are set above
these, see `xcstack.worker`, so a client gets the JSON error model, not a server's bare status):
- request target longer than `max_url_bytes` -> 414 `url_too_long`;
- more than `max_headers` fields / a head over `max_header_bytes` -> 431 `too_many_headers` /
  `headers_too_large`;
- body over `max_body_bytes` -> 413; a client slower than `body_timeout_s` to send its body -> 408
  `request_timeout` and the connection is closed. The body timeout bounds only the time the app waits
  for body bytes: once the body is complete, `receive()` (disconnect watchers of streams and long calls)
  waits without limit, so answers of any length are never cut.
A client that leaves while sending its body is logged as one INFO line, not an error with a traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xcstack.config import ServerSettings
from xcstack.errors import CoreCode, PayloadTooLarge, XCError
from xcstack.httputil import dumps
from xcstack.observability.logs import request_id_var, reset_client_request_id, set_client_request_id
from xcstack.observability.metrics import HTTP_EARLY_CLOSES, HTTP_INFLIGHT, HTTP_LATENCY, HTTP_REQUESTS, Children

# one child per (route, method, status): label look-ups cost more than the updates they precede
_REQUESTS = Children(HTTP_REQUESTS)
_LATENCY = Children(HTTP_LATENCY)

access_log = logging.getLogger("xcstack.access")
log = logging.getLogger("xcstack.http")
_VALID_RID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Request ids need to be unique, not secret: a random per-process prefix and a counter
# (uuid4 cost ~38 µs per request on VMs where os.urandom is slow).
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class RequestTimeout(XCError):
    status = 408
    type = "invalid_request_error"
    code = CoreCode.REQUEST_TIMEOUT


class ObservabilityMiddleware:
    def __init__(
        self, app: ASGIApp, max_body_bytes: int, log_access: bool = True, *, server: ServerSettings | None = None
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.log_access = log_access
        limits = server or ServerSettings()
        self.max_url = limits.max_url_bytes
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.body_timeout = limits.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # the request id is always ours: a client's X-Request-Id is kept apart (audit records could
        # otherwise be made to look like another request's)
        rid = new_request_id()
        client_rid, declared, rejection = self._scan(scope)
        scope["xc.request_id"] = rid
        extra_headers = [(b"x-request-id", rid.encode())]
        if client_rid is not None:
            scope["xc.client_request_id"] = client_rid
            extra_headers.append((b"x-client-request-id", client_rid.encode()))
        token = request_id_var.set(rid)
        ctoken = set_client_request_id(rid, client_rid)
        start = time.perf_counter()
        status = 500
        method = scope["method"]

        if rejection is None and declared is not None and declared > self.max_body:
            rejection = PayloadTooLarge(f"request body is {declared} bytes; the limit is {self.max_body}")
        if rejection is not None:
            await _send_error(send, rejection.status, rejection.body(), extra_headers)
            self._record(scope, method, rejection.status, start, rid, client_rid)
            reset_client_request_id(ctoken)
            request_id_var.reset(token)
            return

        received = 0
        body_wait_left = self.body_timeout  # seconds the app may still wait for body bytes
        body_done = False
        closing = False  # the request body was not read to its end: the connection must not be reused
        departed = False  # the client left before its body was complete

        async def guarded_receive() -> Message:
            nonlocal received, body_wait_left, body_done, closing, departed
            if body_done:
                return await receive()
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(body_wait_left):
                    message = await receive()
            except TimeoutError:
                closing = body_done = True
                HTTP_EARLY_CLOSES.labels("body_timeout").inc()
                log.info("request body timed out", extra={"path": scope.get("path", ""), "client": _client(scope)})
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout:g} s") from None
            body_wait_left -= time.monotonic() - t0
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    closing = body_done = True
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body} bytes")
                if not message.get("more_body", False):
                    body_done = True
            elif message["type"] == "http.disconnect":
                body_done = departed = True
                scope["xc.client_disconnected"] = True
                HTTP_EARLY_CLOSES.labels("client_left").inc()
                log.info("client left before sending its whole request body",
                         extra={"path": scope.get("path", ""), "client": _client(scope), "received": received})
            return message

        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = list(message.get("headers", ()))
                present = {k for k, _ in headers}  # ASGI header names are lower-case
                headers += [h for h in extra_headers if h[0] not in present]
                if closing and b"connection" not in present:
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        HTTP_INFLIGHT.inc()
        try:
            await self.app(scope, guarded_receive, send_wrapper)
        except Exception as exc:
            if not departed:
                raise
            # the app gave up on a client that left (e.g. Starlette's ClientDisconnect while reading the
            # body): logged above as one line, not a server error with a traceback
            log.debug("request abandoned after the client left: %s", type(exc).__name__)
        finally:
            HTTP_INFLIGHT.dec()
            if scope.get("xc.client_disconnected") and not started:
                status = 499  # the client left before an answer (nginx's convention)
            self._record(scope, method, status, start, rid, client_rid)
            reset_client_request_id(ctoken)
            request_id_var.reset(token)

    def _scan(self, scope: Scope) -> tuple[str | None, int | None, XCError | None]:
        """One pass over the head: the client's request id, the declared body size, and the limit it breaks."""
        client_rid: str | None = None
        declared: int | None = None
        headers = scope.get("headers", ())
        target = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
        size = target
        for key, value in headers:
            size += len(key) + len(value) + 4
            if key == b"x-request-id" and client_rid is None:
                candidate = value.decode("latin-1")
                if _VALID_RID.match(candidate):
                    client_rid = candidate
            elif key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        rejection: XCError | None = None
        if target > self.max_url:
            rejection = XCError(f"the request target is {target} bytes; the limit is {self.max_url}",
                                status=414, type="invalid_request_error", code=CoreCode.URL_TOO_LONG)
        elif len(headers) > self.max_headers:
            rejection = XCError(f"the request has {len(headers)} header fields; the limit is {self.max_headers}",
                                status=431, type="invalid_request_error", code=CoreCode.TOO_MANY_HEADERS)
        elif size > self.max_head:
            rejection = XCError(f"the request head is {size} bytes; the limit is {self.max_head}",
                                status=431, type="invalid_request_error", code=CoreCode.HEADERS_TOO_LARGE)
        if rejection is not None:
            HTTP_EARLY_CLOSES.labels(rejection.code).inc()
        return client_rid, declared, rejection

    def _record(
        self, scope: Scope, method: str, status: int, start: float, rid: str, client_rid: str | None
    ) -> None:
        elapsed = time.perf_counter() - start
        route = _route_label(scope, status)
        code = str(status)
        _REQUESTS(route, method, code).inc()
        _LATENCY(route, method, code).observe(elapsed)
        if self.log_access:
            access_log.info(
                "%s %s %d",
                method,
                scope.get("path", ""),
                status,
                extra={
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": _client(scope),
                    "request_id": rid,
                    "client_request_id": client_rid,
                },
            )


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _route_label(scope: Scope, status: int) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    return "<unmatched>" if status in (404, 405) else "<other>"


async def _send_error(send: Send, status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]]) -> None:
    payload = dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *extra_headers,
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
