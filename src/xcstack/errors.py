"""The one error model: every failure a client sees is JSON `{"error": {type, code, message}}`.

Codes are stable strings that clients can switch on; messages are for humans. Services raise
`XCError` (or a subclass) and never build responses themselves; `app.py` turns them into JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class XCError(Exception):
    """An error with an HTTP status, an OpenAI-style type and a stable code."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

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
    code = "bad_request"


class Unauthorized(XCError):
    status = 401
    type = "authentication_error"
    code = "unauthorized"


class Forbidden(XCError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(XCError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(XCError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(XCError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(XCError):
    """429: the client is over its own rate; it should slow down."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": _retry_after(retry_after)})


class Overloaded(XCError):
    """503: the server (or a backend) is full or down; the request may be retried elsewhere/later."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": _retry_after(retry_after)})


class UpstreamError(XCError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class GatewayTimeout(XCError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


def _retry_after(seconds: float) -> str:
    return str(max(1, int(seconds + 0.999)))


#: Codes that are built at run time rather than written as a literal `code=` (the OpenAPI document
#: collects literals from the source; these complete it).
HTTP_METHOD_NOT_ALLOWED = "method_not_allowed"
HTTP_ERROR = "http_error"
REQUEST_TIMEOUT = "request_timeout"
PASSWORD_CHANGE_REQUIRED = "password_change_required"  # a session restricted to a password change
TOTP_ENROLLMENT_REQUIRED = "totp_enrollment_required"  # a session restricted to TOTP enrolment
