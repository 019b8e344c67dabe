"""Raw ASGI I/O of the gateway's endpoints: the bounded body read, JSON answers and the caller's key.

The generation endpoints are raw ASGI apps (not Starlette request/response functions) so that the
gateway controls the body read, the `http.disconnect` watch and every `send` itself (see `relay.py`).
"""

from __future__ import annotations

import hashlib

from xcstack.errors import CoreCode, PayloadTooLarge, XCError
from xcstack.gateway.types import Receive, Scope, Send
from xcstack.httputil import dumps

_JSON_CT = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected (while we read its body, or waited for a slot)."""


def key_id(scope: Scope) -> str:
    """The API key identity for rate limits and metrics: the security principal's id when the
    security middleware set one, else a hash of the bearer token, else 'anonymous'."""
    principal = scope.get("xc.principal")
    if principal is not None:
        return str(getattr(principal, "id", principal))
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            token = value[7:] if value[:7].lower() == b"bearer " else value
            return "k:" + hashlib.sha256(token.strip()).hexdigest()[:16]
    return "anonymous"


async def read_body(receive: Receive, limit: int, scope: Scope) -> bytes:
    """The whole request body, at most `limit` bytes (413 `payload_too_large` as soon as it is
    exceeded, or at once when Content-Length says so); `ClientGone` if the client leaves."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body is {int(value)} bytes; the limit is {limit}",
                                  code=CoreCode.PAYLOAD_TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        body = msg.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes",
                                      code=CoreCode.PAYLOAD_TOO_LARGE)
            chunks.append(body)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(send: Send, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = [_JSON_CT, (b"content-length", str(len(payload)).encode())]
    if headers:
        hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(send: Send, err: XCError) -> None:
    await send_json(send, err.status, dumps(err.body()), err.headers)
