"""The security ASGI middleware: authentication, RBAC, and one durable audit record per API call.

For every http/websocket request but the public paths (`/healthz`, `/readyz`, `/metrics` when
`metrics_public`, and `POST /v1/auth/login`):

1. authenticates the bearer token (session or API key); none or invalid → 401 + audit record;
2. puts the principal at `scope["xc.principal"]` (`.id`, `.name`, `.roles`, `.kind`) and installs
   `scope["xc.authorizer"]` / `scope["xc.audit"]` for `security.guard.authorize` / `audit`;
3. finds the route the router will pick (same matching as Starlette, through Mounts) and checks
   its permission: the endpoint's `@requires(resource, action)` mark, or by default
   `("route:<path template>", "<method>")` — deny by default, every denial audited (403);
4. a session restricted to a password change or TOTP enrolment may only use `/v1/auth/*`;
5. queues the API-call record (who, method, route, status, ip, request id) when the response head
   goes out: a data-plane record, durable within `data_plane_flush_ms` without holding the response
   (`durability = "strict"`: durable before the head); a response that never started is recorded as
   an error. If the audit log cannot take it (queue full, a failed commit), the request fails with
   503 (fail closed).

The keys the security capability signs and seals with (`[security] signing_key` for audit
checkpoints and the trusted-boot manifest, and the secret box key) are its own: no principal may
use them through `authorize(request, "key:<name>", ...)` for anything but `read` / `verify`,
whatever its roles (三权分立: a sysadmin, or a custom role, that could sign with the audit key
could forge checkpoints). Such a denial is audited like any other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from starlette.requests import Request
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xcstack import apiref
from xcstack.errors import Forbidden, Unauthorized, XCError
from xcstack.httputil import ANONYMOUS_PROBE, dumps
from xcstack.security.guard import permission_of
from xcstack.security.service import Principal, ReqInfo

if TYPE_CHECKING:
    from xcstack.security.capability import SecurityCapability

log = logging.getLogger("xcstack.security")

AUTH_TOTAL = Counter("xc_security_auth_total", "Request authentication outcomes", ["outcome"])
DENIALS = Counter("xc_security_denials_total", "Requests denied by RBAC", ["reason"])
_AUTH_OK = AUTH_TOTAL.labels("ok")
_AUTH_DENIED = AUTH_TOTAL.labels("denied")

# The security capability's own self-service routes: any authenticated principal, also a session
# restricted to a password change or TOTP enrolment. An exact list, so no other route can borrow it.
SELF_SERVICE = frozenset({"/v1/auth/logout", "/v1/auth/me", "/v1/auth/password", "/v1/auth/totp/enroll",
                          "/v1/auth/totp/confirm"})
# the login, and the API contract and its reference page (no secret in them; clients generate code from it)
PUBLIC_ROUTES = {("POST", "/v1/auth/login"), *(("GET", p) for p in apiref.PATHS)}
# what anyone allowed to may still do with the security capability's own keys (public-key reads)
RESERVED_KEY_ACTIONS = frozenset({"read", "verify"})


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


_ROUTE_CACHE: dict[tuple[int, str, str, str, str], tuple[Any, str] | None] = {}
_ROUTE_CACHE_MAX = 4096


def resolve_route(app: Any, scope: Scope) -> tuple[Any, str] | None:
    """(endpoint, path template) of the route Starlette's router would choose, or None; the endpoint
    is None when the path matches but the method does not (the router answers 405).

    Cached per (app, type, method, root_path, path): routes do not change while an app runs, and
    the walk costs about as much as the router's own matching."""
    key = (id(app), scope["type"], scope.get("method", ""), scope.get("root_path", ""), scope["path"])
    try:
        return _ROUTE_CACHE[key]
    except KeyError:
        pass
    routes = getattr(getattr(app, "router", None), "routes", None)
    if routes is None:
        routes = getattr(app, "routes", None)
    found = _walk(routes or [], dict(scope), "")
    if len(_ROUTE_CACHE) >= _ROUTE_CACHE_MAX:
        _ROUTE_CACHE.clear()
    _ROUTE_CACHE[key] = found
    return found


def _walk(routes: list[Any], scope: dict[str, Any], prefix: str) -> tuple[Any, str] | None:
    partial: tuple[Any, str] | None = None
    for route in routes:
        try:
            match, child = route.matches(scope)
        except Exception:
            continue
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            sub = dict(scope)
            sub.update(child)
            inner = list(route.routes)
            if not inner:  # an opaque mounted ASGI app: its permission is the mount's, deny by default
                return route.app, prefix + route.path + "/{path:path}"
            found = _walk(inner, sub, prefix + route.path)
            if found is not None:
                return found
            continue
        template = prefix + getattr(route, "path", "")
        if match == Match.FULL:
            return getattr(route, "endpoint", None), template
        # path matches, method does not: Starlette answers 405 and runs nothing, so no permission applies
        partial = partial or (None, template)
    return partial


async def send_error(send: Send, exc: XCError, request_id: str | None) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": dumps(exc.body())})


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, security: SecurityCapability) -> None:
        from xcstack.security.capability import SECRETBOX_KEY

        self.app = app
        self.sec = security
        self.reserved_keys = frozenset({f"key:{security.settings.signing_key}", f"key:{SECRETBOX_KEY}"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sec = self.sec
        settings = sec.settings
        scope["xc.authorizer"] = self.authorize
        scope["xc.audit"] = sec.audit_sink
        path: str = scope["path"]
        method: str = scope.get("method", "GET")
        if path in settings.public_paths or (path == "/metrics" and settings.metrics_public) or (
            (method, path) in PUBLIC_ROUTES
        ):
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
            principal = await sec.service.authenticate(token) if token else None
            if principal is None:
                _AUTH_DENIED.inc()
                await sec.service.audit("anonymous", "auth.denied", f"route:{path[:256]}", "denied", info,
                                        {"method": method, "reason": "invalid token" if token else "no token"})
                raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'",
                                   code="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="xcstack"'})
            _AUTH_OK.inc()
            scope["xc.principal"] = principal
            found = resolve_route(scope.get("app"), scope)
            template = found[1] if found else path[:256]
            if found is not None and found[0] is not None:  # None: a method the route lacks (405)
                await self._check(principal, found, method, info)
        except XCError as exc:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_error(send, exc, rid)
            return
        await self._call_audited(scope, receive, send, principal, method, template, info)

    async def _valid_token(self, scope: Scope) -> bool:
        """Whether a public path's caller sent a valid bearer token. A token that cannot be checked
        (state store down) counts as none: a health probe must answer, not fail with 500."""
        token = bearer(scope)
        if not token:
            return False
        try:
            return await self.sec.service.authenticate(token) is not None
        except Exception as exc:
            log.warning("token check for a public path failed: %s", type(exc).__name__)
            return False

    async def authorize(self, request: Request, resource: str, action: str) -> None:
        """The `xc.authorizer` of the scope: the security capability's check, after refusing any use
        of its own keys but `read` / `verify`."""
        if resource in self.reserved_keys and action not in RESERVED_KEY_ACTIONS:
            pr = request.scope.get("xc.principal")
            if not isinstance(pr, Principal):
                raise Unauthorized("authentication required", code="unauthorized")
            DENIALS.labels("reserved_key").inc()
            info = ReqInfo(request.scope.get("xc.client_ip"), request.scope.get("xc.request_id"))
            await self.sec.service.audit(pr.name, "access.denied", resource, "denied", info,
                                         {"action": action, "roles": list(pr.roles),
                                          "reason": "key reserved to the security capability"})
            raise Forbidden(f"permission denied: {action} on {resource} (reserved to the security capability)",
                            code="forbidden")
        await self.sec.authorizer(request, resource, action)

    async def _check(self, principal: Principal, found: tuple[Any, str], method: str, info: ReqInfo) -> None:
        endpoint, template = found
        self_service = template in SELF_SERVICE
        if principal.restricted and not self_service:
            DENIALS.labels("restricted").inc()
            await self.sec.service.audit(principal.name, "access.denied", f"route:{template}", "denied", info,
                                         {"method": method, "reason": principal.restricted})
            code = f"{principal.restricted}_required"
            raise Forbidden(f"this session may only be used to complete: {principal.restricted.replace('_', ' ')}",
                            code=code)
        if self_service:
            return
        perm = permission_of(endpoint)
        if perm is None and isinstance(endpoint, type):  # HTTPEndpoint class: marks on get/post/...
            perm = permission_of(getattr(endpoint, method.lower(), None))
        perm = perm or (f"route:{template}", method.lower())
        if not await self.sec.service.is_allowed(principal, perm[0], perm[1]):
            DENIALS.labels("rbac").inc()
            await self.sec.service.audit(principal.name, "access.denied", perm[0], "denied", info,
                                         {"method": method, "route": template, "action": perm[1],
                                          "roles": list(principal.roles)})
            raise Forbidden(f"permission denied: {perm[1]} on {perm[0]}", code="forbidden")

    async def _call_audited(
        self, scope: Scope, receive: Receive, send: Send, principal: Principal, method: str, template: str,
        info: ReqInfo,
    ) -> None:
        if not self.sec.settings.audit.log_api_calls:
            await self.app(scope, receive, send)
            return
        started = False

        async def record(status: int) -> None:
            outcome = "success" if status < 400 else ("denied" if status in (401, 403) else "failure")
            await self.sec.service.audit(principal.name, "api.call", f"route:{template}", outcome, info,
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
