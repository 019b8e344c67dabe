"""The security capability's authorizer: the route check every endpoint runs and the fine-grained
`authorize(request, resource, action)`, each denial audited (403 `forbidden`).

Route check (`check_route`, run by `guard.Guarded` once the router matched the route):

- a path the middleware served as public (`[security] public_paths`, `/metrics` with
  `metrics_public`) or a route declared `@public`: anyone;
- a session restricted to a password change or TOTP enrolment may only use `@authenticated`
  (self-service) routes: 403 `<restriction>_required`;
- `@authenticated`: any authenticated principal;
- `@requires(resource, action)` / `@requires_route`: the principal's roles must allow it.

The keys the security capability signs and seals with (`[security] signing_key` for audit
checkpoints and the trusted-boot manifest, and the secret box key) are its own: no principal may
use them through `authorize(request, "key:<name>", ...)` for anything but `read` / `verify`,
whatever its roles (三权分立: a sysadmin, or a custom role, that could sign with the audit key
could forge checkpoints). Such a denial is audited like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter
from starlette.requests import Request
from starlette.types import Scope

from xcstack.errors import CoreCode, Forbidden, Unauthorized
from xcstack.security.guard import Permission
from xcstack.security.protocol import SecurityCode
from xcstack.security.service import Principal, ReqInfo

if TYPE_CHECKING:
    from xcstack.security.service import SecurityService

DENIALS = Counter("xc_security_denials_total", "Requests denied by RBAC", ["reason"])
#: scope flag the middleware sets on a path it served without authentication
PUBLIC_PATH = "xc.public_path"
#: a restricted session's reason (Principal.restricted) -> the code of the 403 on any other route
RESTRICTED_CODES = {"password_change": SecurityCode.PASSWORD_CHANGE_REQUIRED,
                    "totp_enrollment": SecurityCode.TOTP_ENROLLMENT_REQUIRED}
#: what anyone allowed to may still do with the security capability's own keys (public-key reads)
RESERVED_KEY_ACTIONS = frozenset({"read", "verify"})


def request_info(scope: Scope) -> ReqInfo:
    return ReqInfo(scope.get("xc.client_ip"), scope.get("xc.request_id"))


def _principal(scope: Scope) -> Principal:
    pr = scope.get("xc.principal")
    if not isinstance(pr, Principal):
        raise Unauthorized("authentication required", code=CoreCode.UNAUTHORIZED)
    return pr


class SecurityAuthorizer:
    """RBAC over the security service's roles; `reserved_keys` are `key:<name>` resources of its own."""

    def __init__(self, service: SecurityService, reserved_keys: frozenset[str]) -> None:
        self.service = service
        self.reserved_keys = reserved_keys

    async def check_route(self, scope: Scope, permission: Permission, template: str) -> None:
        if permission.kind == "public" or scope.get(PUBLIC_PATH):
            return
        principal = _principal(scope)
        method = scope.get("method", "GET")
        self_service = permission.kind == "authenticated"
        if principal.restricted and not self_service:
            DENIALS.labels("restricted").inc()
            await self.service.audit(principal.name, "access.denied", f"route:{template}", "denied",
                                     request_info(scope), {"method": method, "reason": principal.restricted})
            raise Forbidden(f"this session may only be used to complete: {principal.restricted.replace('_', ' ')}",
                            code=RESTRICTED_CODES.get(principal.restricted, CoreCode.FORBIDDEN))
        if self_service:
            return
        resource, action = permission.resolve(template, method)
        if not await self.service.is_allowed(principal, resource, action):
            DENIALS.labels("rbac").inc()
            await self.service.audit(principal.name, "access.denied", resource, "denied", request_info(scope),
                                     {"method": method, "route": template, "action": action,
                                      "roles": list(principal.roles)})
            raise Forbidden(f"permission denied: {action} on {resource}", code=CoreCode.FORBIDDEN)

    async def authorize(self, request: Request, resource: str, action: str) -> None:
        pr = _principal(request.scope)
        info = caller_info(request)
        if resource in self.reserved_keys and action not in RESERVED_KEY_ACTIONS:
            DENIALS.labels("reserved_key").inc()
            await self.service.audit(pr.name, "access.denied", resource, "denied", info,
                                     {"action": action, "roles": list(pr.roles),
                                      "reason": "key reserved to the security capability"})
            raise Forbidden(f"permission denied: {action} on {resource} (reserved to the security capability)",
                            code=CoreCode.FORBIDDEN)
        if not await self.service.is_allowed(pr, resource, action):
            await self.service.audit(pr.name, "access.denied", resource, "denied", info,
                                     {"action": action, "roles": list(pr.roles)})
            raise Forbidden(f"permission denied: {action} on {resource}", code=CoreCode.FORBIDDEN)


def caller_info(request: Request) -> ReqInfo:
    """Who called, for an audit record: the client IP the middleware resolved (proxy headers), else the peer."""
    ip = request.scope.get("xc.client_ip") or (request.client.host if request.client else None)
    return ReqInfo(ip, request.scope.get("xc.request_id"))
