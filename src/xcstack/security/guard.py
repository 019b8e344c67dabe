"""The seam between capabilities and the security layer: permission declarations and the checks.

Every route declares its permission where it is declared, with one of four marks:

- `@requires(resource, action)` — a coarse permission (`("crypto", "sign")`);
- `@requires_route` — the route's own permission, `("route:<path template>", "<method>")`;
- `@public` — anyone, no token (the login, the API contract);
- `@authenticated` — any authenticated principal, also a session restricted to a password change or
  TOTP enrolment (the self-service `/v1/auth/*` routes).

`app.py` wraps each route's ASGI app in `Guarded` when it builds the app, so the router matches a
route once and its permission is checked right there; a route without a mark fails the build
(`UndeclaredPermission`). Fine-grained checks (a model, a named query, a collection, a key) call
`await authorize(...)`, which asks the authorizer installed in the scope (`xc.authorizer`) and
raises when there is none: no check passes by omission. With `[security] enabled = false` the app
installs `AllowAll`, chosen by that setting alone. `audit(...)` records an event (`xc.audit`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from xcstack.errors import XCError

F = TypeVar("F", bound=Callable[..., Any])
AuthorizeFn = Callable[[Request, str, str], Awaitable[None]]
AuditSink = Callable[[Request, str, str, str, dict[str, Any] | None], Awaitable[None]]

#: scope keys: the fine-grained check, the audit sink, and the template of the route being served
AUTHORIZER = "xc.authorizer"
AUDIT = "xc.audit"
ROUTE_TEMPLATE = "xc.route"

_MARK = "__xc_permission__"
_HANDLERS = ("get", "head", "post", "put", "patch", "delete", "options")


@dataclass(frozen=True)
class Permission:
    """What a route needs (see the module docstring for the four kinds)."""

    kind: Literal["requires", "route", "public", "authenticated"]
    resource: str = ""
    action: str = ""

    def resolve(self, template: str, method: str) -> tuple[str, str]:
        """(resource, action) to check for `requires` and `route` permissions."""
        if self.kind == "route":
            return f"route:{template}", method.lower()
        return self.resource, self.action


PUBLIC = Permission("public")
AUTHENTICATED = Permission("authenticated")
ROUTE = Permission("route")


def _mark(fn: F, permission: Permission) -> F:
    setattr(fn, _MARK, permission)
    return fn


def requires(resource: str, action: str) -> Callable[[F], F]:
    """Mark an endpoint with the coarse permission it needs."""
    return lambda fn: _mark(fn, Permission("requires", resource, action))


def requires_route(fn: F) -> F:
    """Mark an endpoint as needing its route's own permission: `("route:<template>", "<method>")`."""
    return _mark(fn, ROUTE)


def public(fn: F) -> F:
    """Mark an endpoint anyone may call without a token."""
    return _mark(fn, PUBLIC)


def authenticated(fn: F) -> F:
    """Mark a self-service endpoint: any authenticated principal (also a restricted session)."""
    return _mark(fn, AUTHENTICATED)


def declaration_of(endpoint: Any, method: str | None = None) -> Permission | None:
    """The endpoint's mark; for a class endpoint (HTTPEndpoint) the mark of its handler for `method`."""
    found = getattr(endpoint, _MARK, None)
    if found is None and isinstance(endpoint, type) and method is not None:
        name = method.lower()
        handler = getattr(endpoint, name, None)
        if handler is None and name == "head":  # HTTPEndpoint answers HEAD with its get()
            handler = getattr(endpoint, "get", None)
        found = getattr(handler, _MARK, None)
    return found if isinstance(found, Permission) else None


def permission_of(endpoint: Any) -> tuple[str, str] | None:
    """The (resource, action) of an endpoint's `@requires` mark, None for any other declaration."""
    found = declaration_of(endpoint)
    return (found.resource, found.action) if found is not None and found.kind == "requires" else None


def undeclared_handlers(endpoint: Any) -> list[str]:
    """The handlers of an endpoint that declare no permission (empty: every one is declared)."""
    if declaration_of(endpoint) is not None:
        return []
    if isinstance(endpoint, type):
        handlers = [h for h in _HANDLERS if h != "head" and callable(getattr(endpoint, h, None))]
        missing = [h.upper() for h in handlers if declaration_of(endpoint, h) is None]
        return missing if handlers else ["*"]
    return ["*"]


@runtime_checkable
class Authorizer(Protocol):
    """Who may call what: the route check `Guarded` runs and the fine-grained `authorize`."""

    async def check_route(self, scope: Scope, permission: Permission, template: str) -> None:
        """Raise (401/403, audited) unless the caller may call this route."""

    async def authorize(self, request: Request, resource: str, action: str) -> None:
        """Raise (403, audited) unless the caller may do `action` on `resource`."""


class AllowAll:
    """The authorizer of `[security] enabled = false`: every check passes. Chosen by that setting only."""

    async def check_route(self, scope: Scope, permission: Permission, template: str) -> None:
        return None

    async def authorize(self, request: Request, resource: str, action: str) -> None:
        return None


class UndeclaredPermission(RuntimeError):
    """A route declares no permission: the app refuses to build rather than guess one."""


class NoAuthorizer(RuntimeError):
    """`authorize` ran where no authorizer was installed: refused, never passed by omission."""


class Guarded:
    """A route's ASGI app behind its permission check. The router matched the route, so the
    template and the declaration are known here without matching again."""

    def __init__(self, app: ASGIApp, endpoint: Any, template: str, authorizer: Authorizer) -> None:
        self.app = app
        self.endpoint = endpoint
        self.template = template
        self.authorizer = authorizer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault(AUTHORIZER, self.authorizer.authorize)
        scope[ROUTE_TEMPLATE] = self.template
        permission = declaration_of(self.endpoint, scope.get("method", "GET"))
        if permission is None:  # a class endpoint without a handler for this method: nothing runs
            raise HTTPException(405)
        try:
            await self.authorizer.check_route(scope, permission, self.template)
        except XCError:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            raise
        await self.app(scope, receive, send)


async def authorize(request: Request, resource: str, action: str) -> None:
    """Raise Forbidden (and audit the denial) unless the caller may do `action` on `resource`."""
    check: AuthorizeFn | None = request.scope.get(AUTHORIZER)
    if check is None:
        raise NoAuthorizer(f"no authorizer for {action} on {resource}: the route was not built by the app")
    await check(request, resource, action)


async def audit(
    request: Request, action: str, resource: str, outcome: str, detail: dict[str, Any] | None = None
) -> None:
    """Record an event through the scope's audit sink (none without the security capability)."""
    sink: AuditSink | None = request.scope.get(AUDIT)
    if sink is not None:
        await sink(request, action, resource, outcome, detail)
