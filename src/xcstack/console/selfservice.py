"""Every user's own API keys in the console ("my keys"): list, issue with some of the caller's own
roles (the key shown once), revoke. Through `/v1/security/me/keys` as the caller, which enforces
the rules (own roles only, no administrator role, expiry bounded, own keys only) and audits."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.console.web import HTML, Page, call_api, check_csrf, key_request, principal_of, read_form, seg
from xcstack.security.guard import authenticated

ADMIN_ROLES = ("sysadmin", "secadmin", "auditor")  # not self-service (the API refuses them; not offered here)


def selfservice_routes(page: Page) -> list[BaseRoute]:
    """The routes, relative to the /console mount."""

    async def view(request: Request, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/security/me/keys")
        own = [x for x in principal_of(request).roles if x not in ADMIN_ROLES]
        return await page(request, "mykeys.html", status, api=r, keys=r.items("keys"), own_roles=own, **ctx)

    @authenticated
    @api("Console: the caller's own API keys", streams=HTML, tag="console")
    async def my_keys(request: Request) -> Response:
        return await view(request)

    @authenticated
    @api("Console: issue an API key for the caller (shown once)", streams=HTML, tag="console")
    async def my_keys_create(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        body = key_request(form)
        r = await call_api(request, "POST", "/v1/security/me/keys", json=body)
        if not r.ok:
            return await view(request, **r.outcome())
        return await view(request, 201, secret_label="key_once", secret=r.json()["key"], flash=["saved"])

    @authenticated
    @api("Console: revoke one of the caller's own API keys", streams=HTML, tag="console")
    async def my_keys_revoke(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "DELETE", f"/v1/security/me/keys/{seg(request.path_params['id'])}")
        return await view(request, **r.outcome())

    return [
        Route("/me/keys", my_keys, methods=["GET"]),
        Route("/me/keys", my_keys_create, methods=["POST"]),
        Route("/me/keys/{id}/revoke", my_keys_revoke, methods=["POST"]),
    ]
