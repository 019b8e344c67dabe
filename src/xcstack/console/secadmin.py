"""The security administrator's console pages: accounts locked by failed sign-ins (unlock), the
active sessions (end one), the names of the secrets at rest (never a value), and the content-safety
policies and lists (read-only, never a list's words). All through the API as the caller
(`security.policy`, the secadmin's under 三权分立); the API authorizes and audits each call again."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.console.web import HTML, Page, call_api, can, check_csrf, principal_of, read_form, seg
from xcstack.security.guard import requires
from xcstack.security.sessions import session_id


def secadmin_routes(page: Page) -> list[BaseRoute]:
    """The routes, relative to the /console mount."""

    async def view(request: Request, status: int = 200, **ctx: Any) -> Response:
        locks = await call_api(request, "GET", "/v1/security/lockouts")
        secrets = await call_api(request, "GET", "/v1/security/secrets")
        sessions = await call_api(request, "GET", "/v1/security/sessions")
        failed = next((r for r in (locks, secrets, sessions) if not r.ok), locks)
        return await page(request, "security.html", status, api=failed, locked=locks.items("locked"),
                          secrets=secrets.items("secrets"), sessions=sessions.items("sessions"),
                          own_session=own_session_id(request),
                          may_unlock=await can(request, "security.policy", "write"), **ctx)

    @requires("security.policy", "read")
    @api("Console: locked accounts and the secrets' names", streams=HTML, tag="console")
    async def security(request: Request) -> Response:
        return await view(request)

    @requires("security.policy", "write")
    @api("Console: unlock an account locked by failed sign-ins", streams=HTML, tag="console")
    async def unlock(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "DELETE", f"/v1/security/lockouts/{seg(request.path_params['name'])}")
        return await view(request, **r.outcome())

    @requires("security.policy", "write")
    @api("Console: end a session (its cookie or token stops working at once)", streams=HTML, tag="console")
    async def end_session(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "DELETE", f"/v1/security/sessions/{seg(request.path_params['id'])}")
        return await view(request, **r.outcome("session_ended"))

    @requires("security.policy", "read")
    @api("Console: content-safety policies, keyword lists (never their words) and label settings", streams=HTML,
         tag="console")
    async def safety(request: Request) -> Response:
        r = await call_api(request, "GET", "/v1/safety/policies")
        return await page(request, "safety.html", api=r, safety=r.json() if r.ok else None)

    return [
        Route("/security", security, methods=["GET"]),
        Route("/security/unlock/{name}", unlock, methods=["POST"]),
        Route("/security/sessions/{id}/end", end_session, methods=["POST"]),
        Route("/safety", safety, methods=["GET"]),
    ]


def own_session_id(request: Request) -> str | None:
    """The listed id of the caller's own session (marked on the page: ending it signs the caller out)."""
    th = getattr(principal_of(request), "session", None)
    return session_id(th) if isinstance(th, str) and th else None
