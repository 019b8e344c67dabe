"""The security administrator's console page: accounts locked by failed sign-ins (unlock) and the
names of the secrets at rest (never a value). Both through the API as the caller (`security.policy`,
the secadmin's under 三权分立); the API authorizes and audits each call again."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.console.sysadmin import HTML, Page, seg
from xcstack.console.web import call_api, can, check_csrf, read_form
from xcstack.security.guard import requires


def secadmin_routes(page: Page) -> list[BaseRoute]:
    """The routes, relative to the /console mount."""

    async def view(request: Request, status: int = 200, **ctx: Any) -> Response:
        locks = await call_api(request, "GET", "/v1/security/lockouts")
        secrets = await call_api(request, "GET", "/v1/security/secrets")
        bad = next((r for r in (locks, secrets) if not r.ok), None)
        return await page(request, "security.html", status,
                          locked=(locks.json() or {}).get("locked", []) if locks.ok else [],
                          secrets=(secrets.json() or {}).get("secrets", []) if secrets.ok else [],
                          may_unlock=await can(request, "security.policy", "write"),
                          api_error=ctx.pop("api_error", None) or (bad.error if bad else None), **ctx)

    @requires("security.policy", "read")
    @api("Console: locked accounts and the secrets' names", streams=HTML, tag="console")
    async def security(request: Request) -> Response:
        return await view(request)

    @requires("security.policy", "write")
    @api("Console: unlock an account locked by failed sign-ins", streams=HTML, tag="console")
    async def unlock(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "DELETE", f"/v1/security/lockouts/{seg(request.path_params['name'])}")
        return await view(request, 200 if r.ok else r.status, api_error=None if r.ok else r.error,
                          flash=["saved"] if r.ok else [])

    return [
        Route("/security", security, methods=["GET"]),
        Route("/security/unlock/{name}", unlock, methods=["POST"]),
    ]
