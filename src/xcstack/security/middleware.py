"""The security ASGI middleware: authentication and one durable audit record per API call.

For every http/websocket request but the public paths (`[security] public_paths`, `/metrics` when
`metrics_public`, and the routes always public: `POST /v1/auth/login` and the API contract):

1. authenticates the bearer token (session or API key); none or invalid → 401 + audit record;
2. puts the principal at `scope["xc.principal"]` (`.id`, `.name`, `.roles`, `.kind`) and installs
   `scope["xc.authorizer"]` / `scope["xc.audit"]` for `security.guard.authorize` / `audit`;
3. queues the API-call record (who, method, route, status, ip, request id) when the response head
   goes out: a data-plane record, durable within `data_plane_flush_ms` without holding the response
   (`durability = "strict"`: durable before the head); a response that never started is recorded as
   an error. If the audit log cannot take it (queue full, a failed commit), the request fails with
   503 (fail closed).

The route's permission is not checked here: the router matches the route once and its `Guarded`
app (`security.guard`, wrapped by `app.py`) runs the check (`security.authz.SecurityAuthorizer`).
A public path is flagged (`authz.PUBLIC_PATH`) so that check lets it through.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xcstack import apiref
from xcstack.errors import CoreCode, Unauthorized, XCError
from xcstack.httputil import ANONYMOUS_PROBE, dumps
from xcstack.security.authz import PUBLIC_PATH, SecurityAuthorizer, caller_info
from xcstack.security.guard import AUDIT, AUTHORIZER, ROUTE_TEMPLATE
from xcstack.security.service import Principal, ReqInfo, SecurityService
from xcstack.security.settings import SecuritySettings

log = logging.getLogger("xcstack.security")

AUTH_TOTAL = Counter("xc_security_auth_total", "Request authentication outcomes", ["outcome"])
_AUTH_OK = AUTH_TOTAL.labels("ok")
_AUTH_DENIED = AUTH_TOTAL.labels("denied")

# the login, and the API contract and its reference page (no secret in them; clients generate code from it)
PUBLIC_ROUTES = {("POST", "/v1/auth/login"), *(("GET", p) for p in apiref.PATHS)}

# the web console (docs/console.md): under CONSOLE_PREFIX only, the session token may come in the
# HttpOnly cookie CONSOLE_COOKIE instead of the Authorization header (`scope[CONSOLE_VIA_COOKIE]` is then
# set: the console checks its CSRF token on every POST); its sign-in page and static files are public,
# and a browser navigation without a valid session is sent to the sign-in page instead of a 401
CONSOLE_PREFIX = "/console"
CONSOLE_COOKIE = "xc_console"
CONSOLE_VIA_COOKIE = "xc.console_cookie"
CONSOLE_PUBLIC = frozenset({("GET", "/console/login"), ("POST", "/console/login")})
CONSOLE_STATIC = "/console/static/"
#: scope key: `await scope[CAN](principal, resource, action)`, a check that audits nothing (menus)
CAN = "xc.can"


def console_cookie(scope: Scope) -> str | None:
    """The console session cookie's value (None: none sent)."""
    for k, v in scope.get("headers", ()):
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name == CONSOLE_COOKIE and value:
                    return value
    return None


def _wants_html(scope: Scope) -> bool:
    return any(k == b"accept" and b"text/html" in v for k, v in scope.get("headers", ()))


def client_ip(scope: Scope, trust_proxy: bool) -> str | None:
    if trust_proxy:
        for k, v in scope.get("headers", ()):
            if k == b"x-forwarded-for":
                return v.decode("latin-1").split(",")[0].strip()[:64] or None
    client = scope.get("client")
    return str(client[0]) if client else None


def bearer(scope: Scope) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            raw = v.decode("latin-1")
            if raw[:7].lower() == "bearer ":
                return raw[7:].strip()
            return None
    return None


async def send_error(send: Send, exc: XCError, request_id: str | None) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": dumps(exc.body())})


class SecurityMiddleware:
    """Built by the security capability with the services it uses (no capability object: no cycle)."""

    def __init__(self, app: ASGIApp, *, service: SecurityService, settings: SecuritySettings,
                 authorizer: SecurityAuthorizer) -> None:
        self.app = app
        self.service = service
        self.settings = settings
        self.authorize = authorizer.authorize

    async def audit_sink(self, request: Request, action: str, resource: str, outcome: str,
                         detail: dict[str, Any] | None) -> None:
        """`security.guard.audit`'s record: the request's principal (or anonymous) did `action`."""
        pr = request.scope.get("xc.principal")
        actor = pr.name if isinstance(pr, Principal) else "anonymous"
        await self.service.audit(actor, action, resource, outcome, caller_info(request), detail)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        settings = self.settings
        scope[AUTHORIZER] = self.authorize
        scope[AUDIT] = self.audit_sink
        scope[CAN] = self.service.is_allowed
        path: str = scope["path"]
        method: str = scope.get("method", "GET")
        console = path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")
        if path in settings.public_paths or (path == "/metrics" and settings.metrics_public) or (
            (method, path) in PUBLIC_ROUTES
        ) or (console and ((method, path) in CONSOLE_PUBLIC or path.startswith(CONSOLE_STATIC))):
            scope[PUBLIC_PATH] = True
            # health probes answer anyone, but their details (paths, audit position, backends) only a
            # caller whose bearer token is valid: anonymous probes get the verdicts alone
            if not await self._valid_token(scope):
                scope[ANONYMOUS_PROBE] = True
            await self.app(scope, receive, send)
            return
        rid = scope.get("xc.request_id")
        info = ReqInfo(client_ip(scope, settings.trust_proxy_headers), rid)
        scope["xc.client_ip"] = info.ip
        try:
            token = bearer(scope)
            if token is None and console:
                token = console_cookie(scope)
                scope[CONSOLE_VIA_COOKIE] = token is not None
            principal = await self.service.authenticate(token) if token else None
            if principal is None:
                _AUTH_DENIED.inc()
                await self.service.audit("anonymous", "auth.denied", f"route:{path[:256]}", "denied", info,
                                         {"method": method, "reason": "invalid token" if token else "no token"})
                if console and scope["type"] == "http" and method in ("GET", "HEAD") and _wants_html(scope):
                    await send({"type": "http.response.start", "status": 303, "headers": [
                        (b"location", b"/console/login"), (b"cache-control", b"no-store")]})
                    await send({"type": "http.response.body", "body": b""})
                    return
                raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'",
                                   code=CoreCode.UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="xcstack"'})
        except XCError as exc:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_error(send, exc, rid)
            return
        _AUTH_OK.inc()
        scope["xc.principal"] = principal
        await self._call_audited(scope, receive, send, principal, method, info)

    async def _valid_token(self, scope: Scope) -> bool:
        """Whether a public path's caller sent a valid bearer token. A token that cannot be checked
        (state store down) counts as none: a health probe must answer, not fail with 500."""
        token = bearer(scope)
        if not token:
            return False
        try:
            return await self.service.authenticate(token) is not None
        except Exception as exc:
            log.warning("token check for a public path failed: %s", type(exc).__name__)
            return False

    async def _call_audited(
        self, scope: Scope, receive: Receive, send: Send, principal: Principal, method: str, info: ReqInfo,
    ) -> None:
        if not self.settings.audit.log_api_calls:
            await self.app(scope, receive, send)
            return
        started = False

        async def record(status: int) -> None:
            template = scope.get(ROUTE_TEMPLATE) or scope["path"][:256]  # set by the route's Guarded app
            outcome = "success" if status < 400 else ("denied" if status in (401, 403) else "failure")
            await self.service.audit(principal.name, "api.call", f"route:{template}", outcome, info,
                                     {"method": method, "status": status}, data_plane=True)

        async def audited_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                try:  # queued in order (durable within the data-plane window; strict: before the head)
                    await record(int(message["status"]))
                except XCError as exc:
                    log.error("audit unavailable, refusing the response: %s", exc.message)
                    await send_error(send, exc, info.request_id)
                    raise _AuditFailed() from None
            elif message["type"] == "websocket.accept" and not started:
                started = True
                await record(101)
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except _AuditFailed:
            return
        finally:
            if not started:
                try:  # 499: the client went away before an answer (nginx's convention), else a failure
                    await record(499 if scope.get("xc.client_disconnected") else 500)
                except Exception:
                    log.exception("audit record for a failed request could not be written")


class _AuditFailed(Exception):
    pass
