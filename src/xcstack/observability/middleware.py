"""The outermost ASGI middleware: request id, access log, metrics, in-flight count, body limit.

Pure ASGI (no BaseHTTPMiddleware) so it adds little per request and never buffers a stream.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xcstack.errors import PayloadTooLarge
from xcstack.httputil import dumps
from xcstack.observability.logs import request_id_var
from xcstack.observability.metrics import HTTP_INFLIGHT, HTTP_LATENCY, HTTP_REQUESTS

access_log = logging.getLogger("xcstack.access")
_VALID_RID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Request ids need to be unique, not secret: a random per-process prefix and a counter
# (uuid4 cost ~38 µs per request on VMs where os.urandom is slow).
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, log_access: bool = True) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.log_access = log_access
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope["xc.request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        method = scope["method"]

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            err = PayloadTooLarge(f"request body is {declared} bytes; the limit is {self.max_body}")
            await _send_error(send, err.status, err.body(), rid)
            self._record(scope, method, 413, start, rid)
            request_id_var.reset(token)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body} bytes")
            return message

        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        HTTP_INFLIGHT.inc()
        try:
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            HTTP_INFLIGHT.dec()
            if scope.get("xc.client_disconnected") and not started:
                status = 499  # the client left before an answer (nginx's convention)
            self._record(scope, method, status, start, rid)
            request_id_var.reset(token)

    def _record(self, scope: Scope, method: str, status: int, start: float, rid: str) -> None:
        elapsed = time.perf_counter() - start
        route = _route_label(scope, status)
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # label look-ups cost more than the increments: once per (route, method, status)
            code = str(status)
            children = (HTTP_REQUESTS.labels(route, method, code), HTTP_LATENCY.labels(route, method, code))
            if len(self._children) < 10_000:
                self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        if self.log_access:
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                method,
                scope.get("path", ""),
                status,
                extra={
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": client[0] if client else None,
                    "request_id": rid,
                },
            )


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_RID.match(candidate):
                return candidate
            break
    return new_request_id()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _route_label(scope: Scope, status: int) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    return "<unmatched>" if status in (404, 405) else "<other>"


async def _send_error(send: Send, status: int, body: dict[str, Any], rid: str) -> None:
    payload = dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"x-request-id", rid.encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
