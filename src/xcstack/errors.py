"""The one error model: every failure a client sees is JSON `{"error": {type, code, message}}`.

Codes are stable strings that clients can switch on; messages are for humans. Services raise
`XCError` (or a subclass) and never build responses themselves; `app.py` turns them into JSON.
Every code is a member of one catalogue enum: `CoreCode` here (codes of the HTTP layer and codes
several capabilities share), one `StrEnum` per capability in its `protocol.py`; members are `str`,
so the JSON is the plain code. `openapi.ERROR_CATALOGUE` lists them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class CoreCode(StrEnum):
    """Codes of the HTTP layer and the status defaults, plus codes more than one capability raises."""

    INTERNAL_ERROR = "internal_error"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"  # any other status Starlette raises
    REQUEST_TIMEOUT = "request_timeout"
    URL_TOO_LONG = "url_too_long"
    TOO_MANY_HEADERS = "too_many_headers"
    HEADERS_TOO_LARGE = "headers_too_large"
    MALFORMED_REQUEST = "malformed_request"  # not valid HTTP/1.1 (answered by the worker's protocol layer)
    INVALID_JSON = "invalid_json"
    INVALID_PARAMETER = "invalid_parameter"
    MODEL_NOT_FOUND = "model_not_found"  # gateway and local inference
    BATCH_TOO_LARGE = "batch_too_large"  # inference and vectors


class XCError(Exception):
    """An error with an HTTP status, an OpenAI-style type and a stable code."""

    status: int = 500
    type: str = "server_error"
    code: str = CoreCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers: dict[str, str] = dict(headers or {})
        self.param = param

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


class BadRequest(XCError):
    status = 400
    type = "invalid_request_error"
    code: str = CoreCode.BAD_REQUEST


class Unauthorized(XCError):
    status = 401
    type = "authentication_error"
    code: str = CoreCode.UNAUTHORIZED


class Forbidden(XCError):
    status = 403
    type = "permission_error"
    code: str = CoreCode.FORBIDDEN


class NotFound(XCError):
    status = 404
    type = "not_found_error"
    code: str = CoreCode.NOT_FOUND


class Conflict(XCError):
    status = 409
    type = "invalid_request_error"
    code: str = CoreCode.CONFLICT


class PayloadTooLarge(XCError):
    status = 413
    type = "invalid_request_error"
    code: str = CoreCode.PAYLOAD_TOO_LARGE


class RateLimited(XCError):
    """429: the client is over its own rate; it should slow down."""

    status = 429
    type = "rate_limit_error"
    code: str = CoreCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": _retry_after(retry_after)})


class Overloaded(XCError):
    """503: the server (or a backend) is full or down; the request may be retried elsewhere/later."""

    status = 503
    type = "server_error"
    code: str = CoreCode.OVERLOADED

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": _retry_after(retry_after)})


class UpstreamError(XCError):
    status = 502
    type = "server_error"
    code: str = CoreCode.UPSTREAM_ERROR


class GatewayTimeout(XCError):
    status = 504
    type = "server_error"
    code: str = CoreCode.UPSTREAM_TIMEOUT


def _retry_after(seconds: float) -> str:
    return str(max(1, int(seconds + 0.999)))

