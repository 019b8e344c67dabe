"""The seam between capabilities and the security layer.

Routes declare coarse permissions with `@requires(resource, action)` and call `await authorize(...)`
for fine-grained ones (a model, a named query, a collection, a key). `audit(...)` records an event.
The security capability installs the real authorizer and audit sink into the ASGI scope
(`xc.authorizer`, `xc.audit`); without them (security disabled) every check passes and audit
events go nowhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

F = TypeVar("F", bound=Callable[..., Any])
Authorizer = Callable[[Request, str, str], Awaitable[None]]
AuditSink = Callable[[Request, str, str, str, dict[str, Any] | None], Awaitable[None]]


def requires(resource: str, action: str) -> Callable[[F], F]:
    """Mark an endpoint with the permission it needs; the security middleware enforces it."""

    def mark(fn: F) -> F:
        fn.__xc_permission__ = (resource, action)  # type: ignore[attr-defined]
        return fn

    return mark


def permission_of(endpoint: Any) -> tuple[str, str] | None:
    return getattr(endpoint, "__xc_permission__", None)


async def authorize(request: Request, resource: str, action: str) -> None:
    """Raise Forbidden (and audit the denial) unless the caller may do `action` on `resource`."""
    check: Authorizer | None = request.scope.get("xc.authorizer")
    if check is not None:
        await check(request, resource, action)


async def audit(
    request: Request, action: str, resource: str, outcome: str, detail: dict[str, Any] | None = None
) -> None:
    sink: AuditSink | None = request.scope.get("xc.audit")
    if sink is not None:
        await sink(request, action, resource, outcome, detail)
