"""The console's pages (all under /console, mounted by the console capability).

Each handler carries the same permission mark as the API calls it makes (the route guard refuses
a page the caller may not see, audited like any denial) and then makes those calls through the
API itself (`web.call_api`), so every action is authorized and audited by the API once more.
The sign-in page and the static files are public; the self-service pages (profile, password, TOTP,
usage) are `@authenticated`, like `/v1/auth/*`, so a session restricted to a password change or
TOTP enrolment can complete it here.
"""

from __future__ import annotations

import base64
import csv
import io
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.console.metrics import SharedSnapshot, in_thread, snapshot
from xcstack.console.secadmin import secadmin_routes
from xcstack.console.selfservice import selfservice_routes
from xcstack.console.sysadmin import sysadmin_routes
from xcstack.console.web import (
    CONSOLE_COOKIE,
    HERE,
    HTML,
    PRE_COOKIE,
    SECURITY_HEADERS,
    ApiResult,
    Pages,
    call_api,
    can,
    check_csrf,
    csrf_for,
    key_request,
    new_pre_secret,
    principal_of,
    read_form,
    seg,
    set_cookie,
)
from xcstack.errors import CoreCode, NotFound, XCError
from xcstack.httputil import JSONResponse, dumps
from xcstack.observability.metrics import render
from xcstack.security.guard import authenticated, public, requires
from xcstack.security.middleware import console_cookie

STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
USER_ACTIONS = ("disable", "enable", "reset-password", "reset-totp")
# (href, word, resource, action): the menu; an entry shows when the caller's roles allow the permission
# its page needs (the page checks it again, and so does every API call the page makes)
MENU = (
    ("/console/overview", "overview", "route:/metrics", "get"),
    ("/console/models", "models", "route:/v1/models", "get"),
    ("/console/vectors", "vectors", "vector", "read"),
    ("/console/db", "db", "db", "query"),
    ("/console/jobs", "jobs", "route:/v1/jobs", "get"),
    ("/console/crypto", "crypto_keys", "crypto", "list"),
    ("/console/playground", "playground", "route:/v1/models", "get"),
    ("/console/users", "users", "security.user", "read"),
    ("/console/roles", "roles", "security.role", "read"),
    ("/console/keys", "keys", "security.apikey", "read"),
    ("/console/groups", "groups", "security.group", "read"),
    ("/console/security", "security", "security.policy", "read"),
    ("/console/safety", "safety", "security.policy", "read"),
    ("/console/audit", "audit", "audit", "read"),
    ("/console/audit/chains", "chains", "audit", "read"),
)
AUDIT_FILTERS = ("since", "until", "actor", "action", "outcome")


def qr_data_uri(text: str) -> str:
    """An SVG QR code as a data: URI (rendered here: no script, no network). qrcode (and the XML tree it
    writes with) is imported at the first enrolment, not in every http worker."""
    import qrcode
    import qrcode.image.svg

    img = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, box_size=8, border=2)
    return "data:image/svg+xml;base64," + base64.b64encode(img.to_string()).decode()


async def menu(request: Request) -> list[tuple[str, str]]:
    return [(href, word) for href, word, res, act in MENU if await can(request, res, act)]


def build_routes(pages: Pages) -> list[BaseRoute]:
    """The console's routes, relative to the /console mount."""
    metrics_now = SharedSnapshot(in_thread(lambda: snapshot(render()[0].decode("utf-8", "replace"))))

    async def page(request: Request, template: str, status: int = 200, *, api: ApiResult | None = None,
                   **ctx: Any) -> Response:
        """Render a page; `api` is the API answer it shows: a failed one sets the page's status and its error
        line (an action's own error, passed as `api_error`, is shown first)."""
        if api is not None and not api.ok:
            status = api.status
            ctx["api_error"] = ctx.get("api_error") or api.error
        ctx.setdefault("menu", await menu(request) if request.scope.get("xc.principal") else [])
        await pages.ready()
        return pages.render(request, template, status, **ctx)

    def back(to: str) -> Response:
        return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store"})

    # -- sign-in and self-service ------------------------------------------------------------------
    @public
    @api("Console: the sign-in page", streams=HTML, tag="console")
    async def login_page(request: Request) -> Response:
        pre = request.cookies.get(PRE_COOKIE) or new_pre_secret()
        resp = await page(request, "login.html", csrf=csrf_for(pre, "login"), menu=[], username="")
        set_cookie(resp, request, PRE_COOKIE, pre, max_age=3600)
        return resp

    @public
    @api("Console: sign in (password, then TOTP once enrolled)", streams=HTML, tag="console")
    async def login_post(request: Request) -> Response:
        form = await read_form(request)
        pre = request.cookies.get(PRE_COOKIE) or ""
        try:
            await check_csrf(request, form, secret=pre, purpose="login")
        except XCError:  # refused (and audited); the form comes back with a fresh token
            fresh = new_pre_secret()
            resp = await page(request, "login.html", 400, csrf=csrf_for(fresh, "login"), menu=[], username="",
                              errors=["csrf"])
            set_cookie(resp, request, PRE_COOKIE, fresh, max_age=3600)
            return resp
        body: dict[str, Any] = {"username": form.get("username", ""), "password": form.get("password", "")}
        if form.get("totp"):
            body["totp"] = form["totp"].strip()
        r = await call_api(request, "POST", "/v1/auth/login", json=body, token="")
        if not r.ok:
            word = {"account_locked": "locked", "totp_required": "totp_needed", "invalid_totp": "bad_totp"}.get(
                r.code, "bad_login")
            status = 429 if r.code == "account_locked" else 401
            return await page(request, "login.html", status, csrf=csrf_for(pre, "login"), menu=[],
                              username=body["username"], errors=[word], retry=r.headers.get("retry-after"))
        out = r.json()
        old = console_cookie(request.scope)
        if old:  # a session already in this browser ends: one sign-in, one fresh session id
            await call_api(request, "POST", "/v1/auth/logout", token=old)
        restricted = out.get("restricted")
        to = {"password_change": "/console/password", "totp_enrollment": "/console/totp"}.get(restricted, "/console/")
        resp = back(to)
        set_cookie(resp, request, CONSOLE_COOKIE, out["token"])
        resp.delete_cookie(PRE_COOKIE, path="/console", httponly=True, samesite="strict")
        return resp

    @authenticated
    @api("Console: sign out (ends the session on the server)", streams=HTML, tag="console")
    async def logout(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        await call_api(request, "POST", "/v1/auth/logout")
        resp = back("/console/login")
        resp.delete_cookie(CONSOLE_COOKIE, path="/console", httponly=True, samesite="strict")
        return resp

    @authenticated
    @api("Console: home (profile, roles, menu)", streams=HTML, tag="console")
    async def home(request: Request) -> Response:
        pr = principal_of(request)
        if pr.restricted == "password_change":
            return back("/console/password")
        if pr.restricted == "totp_enrollment":
            return back("/console/totp")
        return await page(request, "home.html")

    @authenticated
    @api("Console: change the caller's password", streams=HTML, tag="console")
    async def password_page(request: Request) -> Response:
        return await page(request, "password.html")

    @authenticated
    @api("Console: change the caller's password (form)", streams=HTML, tag="console")
    async def password_post(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        if form.get("new_password") != form.get("repeat_password"):
            return await page(request, "password.html", 400, errors=["mismatch"])
        r = await call_api(request, "POST", "/v1/auth/password",
                           json={"old_password": form.get("old_password", ""),
                                 "new_password": form.get("new_password", "")})
        if not r.ok:  # a wrong current password is the API's 401; the console session itself is fine
            return await page(request, "password.html", 400 if r.status == 401 else r.status, api_error=r.error)
        me = (await call_api(request, "GET", "/v1/auth/me")).json() or {}
        return back("/console/totp" if me.get("restricted") == "totp_enrollment" else "/console/")

    @authenticated
    @api("Console: TOTP enrolment", streams=HTML, tag="console")
    async def totp_page(request: Request) -> Response:
        return await page(request, "totp.html", stage="start")

    @authenticated
    @api("Console: TOTP enrolment (begin: QR code; confirm: first code)", streams=HTML, tag="console")
    async def totp_post(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        if form.get("step") == "confirm":
            r = await call_api(request, "POST", "/v1/auth/totp/confirm", json={"code": form.get("code", "")})
            if r.ok:
                return await page(request, "totp.html", stage="done", codes=r.json()["recovery_codes"])
            stage, api_error = "start", r.error
        else:
            r = await call_api(request, "POST", "/v1/auth/totp/enroll")
            if r.ok:
                data = r.json()
                return await page(request, "totp.html", stage="scan", secret=data["secret"],
                                  qr=qr_data_uri(data["otpauth_uri"]))
            stage, api_error = "start", r.error
        return await page(request, "totp.html", r.status, stage=stage, api_error=api_error)

    @authenticated
    @api("Console: the caller's own usage against its quotas", streams=HTML, tag="console")
    async def usage(request: Request) -> Response:
        u = await call_api(request, "GET", "/v1/usage", query={"granularity": "day"})
        q = await call_api(request, "GET", "/v1/quotas")
        return await page(request, "usage.html", usage=u.json() if u.ok else None,
                          quotas=q.json() if q.ok else None, api_error=None if u.ok or u.status == 404 else u.error)

    # -- security administration ---------------------------------------------------------------------
    async def users_view(request: Request, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/security/users")
        roles: list[str] = []
        if await can(request, "security.role", "read"):
            roles = [x["name"] for x in (await call_api(request, "GET", "/v1/security/roles")).items("roles")]
        return await page(request, "users.html", status, api=r, users=r.items("users"),
                          all_roles=roles, may_write=await can(request, "security.user", "write"),
                          may_assign=await can(request, "security.role", "assign"), **ctx)

    @requires("security.user", "read")
    @api("Console: users", streams=HTML, tag="console")
    async def users(request: Request) -> Response:
        return await users_view(request)

    @requires("security.user", "write")
    @api("Console: create a user", streams=HTML, tag="console")
    async def users_create(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        body: dict[str, Any] = {"name": form.get("name", "").strip(), "kind": form.get("kind") or "human"}
        if form.get("roles"):
            body["roles"] = [x.strip() for x in form["roles"].split(",") if x.strip()]
        r = await call_api(request, "POST", "/v1/security/users", json=body)
        if not r.ok:
            return await users_view(request, **r.outcome())
        return await users_view(request, 201, secret_label="one_time_pw", secret=r.json().get("one_time_password"),
                                 flash=["saved"])

    @requires("security.user", "write")
    @api("Console: disable, enable, reset the password or the TOTP of a user", streams=HTML, tag="console")
    async def users_action(request: Request) -> Response:
        action, name = request.path_params["action"], request.path_params["name"]
        if action not in USER_ACTIONS:
            raise NotFound(f"no user action {action!r}", code=CoreCode.NOT_FOUND)
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "POST", f"/v1/security/users/{seg(name)}/{action}")
        if not r.ok:
            return await users_view(request, **r.outcome())
        pw = (r.json() or {}).get("one_time_password")
        return await users_view(request, secret_label="one_time_pw" if pw else "", secret=pw, flash=["saved"])

    @requires("security.role", "assign")
    @api("Console: set a user's roles", streams=HTML, tag="console")
    async def users_roles(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        roles = [x.strip() for x in form.get("roles", "").split(",") if x.strip()]
        r = await call_api(request, "PUT", f"/v1/security/users/{seg(request.path_params['name'])}/roles",
                           json={"roles": roles})
        return await users_view(request, **r.outcome())

    @requires("security.role", "read")
    @api("Console: roles", streams=HTML, tag="console")
    async def roles(request: Request) -> Response:
        r = await call_api(request, "GET", "/v1/security/roles")
        return await page(request, "roles.html", api=r, roles=r.items("roles"))

    async def keys_view(request: Request, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/security/keys")
        return await page(request, "keys.html", status, api=r, keys=r.items("keys"),
                          may_write=await can(request, "security.apikey", "write"),
                          may_quota=await can(request, "route:/v1/quotas", "post"), **ctx)

    @requires("security.apikey", "read")
    @api("Console: API keys", streams=HTML, tag="console")
    async def keys(request: Request) -> Response:
        return await keys_view(request)

    @requires("security.apikey", "write")
    @api("Console: issue an API key (shown once), with an optional monthly token quota", streams=HTML,
         tag="console")
    async def keys_create(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        body = key_request(form)
        r = await call_api(request, "POST", "/v1/security/keys", json=body)
        if not r.ok:
            return await keys_view(request, **r.outcome())
        out = r.json()
        api_error = None
        quota = form.get("quota_tokens", "").strip()
        if quota.isdigit():
            q = await call_api(request, "POST", "/v1/quotas", json={
                "scope": "key", "subject": out["id"], "metric": "total_tokens", "period": "month",
                "limit": int(quota), "hard": True})
            api_error = q.problem
        return await keys_view(request, 201, secret_label="key_once", secret=out["key"], flash=["saved"],
                               api_error=api_error)

    @requires("security.apikey", "write")
    @api("Console: revoke an API key", streams=HTML, tag="console")
    async def keys_revoke(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "DELETE", f"/v1/security/keys/{seg(request.path_params['id'])}")
        return await keys_view(request, **r.outcome())

    async def groups_view(request: Request, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/security/groups")
        return await page(request, "groups.html", status, api=r, groups=r.items("groups"),
                          may_write=await can(request, "security.group", "write"), **ctx)

    @requires("security.group", "read")
    @api("Console: groups", streams=HTML, tag="console")
    async def groups(request: Request) -> Response:
        return await groups_view(request)

    @requires("security.group", "write")
    @api("Console: create a group", streams=HTML, tag="console")
    async def groups_create(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        r = await call_api(request, "POST", "/v1/security/groups",
                           json={"name": form.get("name", "").strip(), "description": form.get("description", "")})
        return await groups_view(request, **r.outcome(ok_status=201))

    # -- audit ---------------------------------------------------------------------------------------
    def audit_query(request: Request) -> dict[str, Any]:
        return {k: request.query_params.get(k, "").strip() for k in (*AUDIT_FILTERS, "request_id", "after")}

    async def fetch_records(request: Request, q: dict[str, Any], limit: int) -> tuple[list[dict[str, Any]],
                                                                                      str | None, ApiResult]:
        """A page of records; the request-id filter (not an API filter) is applied to a wider page here."""
        rid = q.get("request_id")
        api_q = {k: q.get(k) for k in (*AUDIT_FILTERS, "after")}
        api_q["limit"] = 1000 if rid else limit
        r = await call_api(request, "GET", "/v1/audit/records", query=api_q)
        if not r.ok:
            return [], None, r
        page_ = r.json()
        recs = page_["records"]
        if rid:
            recs = [x for x in recs if rid in (x.get("request_id"), x.get("client_request_id"))][:limit]
        return recs, page_.get("next"), r

    @requires("audit", "read")
    @api("Console: audit records with filters (time, actor, action, outcome, request id)", streams=HTML,
         tag="console")
    async def audit(request: Request) -> Response:
        q = audit_query(request)
        recs, nxt, r = await fetch_records(request, q, 100)
        return await page(request, "audit.html", api=r, q=q, records=recs, next=nxt, verify=None,
                          may_verify=await can(request, "audit", "verify"))

    @requires("audit", "verify")
    @api("Console: verify the audit chains", streams=HTML, tag="console")
    async def audit_verify(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "POST", "/v1/audit/verify")
        return await page(request, "audit.html", api=r, q=audit_query(request), records=[], next=None,
                          verify=r.json() if r.ok else None, may_verify=True)

    @requires("audit", "read")
    @api("Console: chains, segments and checkpoints", streams=HTML, tag="console")
    async def audit_chains(request: Request) -> Response:
        r = await call_api(request, "GET", "/v1/audit/chains")
        return await page(request, "chains.html", api=r, chains=r.items("chains"),
                          may_verify=await can(request, "audit", "verify"))

    @requires("audit", "read")
    @api("Console: export the filtered audit records (CSV or JSON lines)",
         streams={"text/csv": "CSV", "application/x-ndjson": "JSON lines"}, tag="console")
    async def audit_export(request: Request) -> Response:
        q = audit_query(request)
        fmt = "csv" if request.query_params.get("format") == "csv" else "jsonl"
        cap = pages.settings.export_max_records

        async def rows() -> AsyncIterator[bytes]:
            n, after = 0, None
            cols = ("chain", "seq", "ts", "actor", "action", "resource", "outcome", "ip", "request_id",
                    "client_request_id", "detail")
            if fmt == "csv":
                yield ("\ufeff" + ",".join(cols) + "\r\n").encode()
            while n < cap:
                recs, nxt, r = await fetch_records(request, {**q, "after": after}, 1000)
                if not r.ok:
                    break
                for x in recs[: cap - n]:
                    if fmt == "csv":
                        buf = io.StringIO()
                        csv.writer(buf).writerow([_cell(x.get(c)) for c in cols])
                        yield buf.getvalue().encode()
                    else:
                        yield dumps(x) + b"\n"
                n += len(recs)
                if not nxt:
                    break
                after = nxt

        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
        name = f"audit.{'csv' if fmt == 'csv' else 'jsonl'}"
        return StreamingResponse(rows(), media_type=media, headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'})

    # -- system administration ----------------------------------------------------------------------
    @requires("route:/metrics", "get")
    @api("Console: the system overview (process tree with cores, upstreams, capabilities, live charts)",
         streams=HTML, tag="console")
    async def overview(request: Request) -> Response:
        p = await call_api(request, "GET", "/v1/system/processes")  # its own section shows a refusal
        return await page(request, "overview.html", pid=os.getpid(), cores=sorted(os.sched_getaffinity(0)),
                          procs=p.json() if p.ok else None, procs_error=p.problem)

    @requires("route:/metrics", "get")
    @api("Console: the overview's live numbers (polled by its page)", response={"type": "object"}, tag="console")
    async def overview_data(request: Request) -> Response:
        # the metrics part is the same for every viewer (this route's permission is /metrics' own), so it
        # is shared and rebuilt at most once a second; readiness and the process table stay per request
        at, data = await metrics_now.get()
        ready = await call_api(request, "GET", "/readyz")  # per viewer: its details depend on who asks
        procs = await call_api(request, "GET", "/v1/system/processes")
        checks = (ready.json() or {}).get("checks", {}) if ready.status in (200, 503) else {}
        return JSONResponse({"metrics": data, "metrics_at": at, "checks": checks, "pid": os.getpid(),
                             "cores": sorted(os.sched_getaffinity(0)), "processes": procs.json() if procs.ok else None},
                            headers={"Cache-Control": "no-store"})

    @requires("route:/v1/models", "get")
    @api("Console: upstreams and models", streams=HTML, tag="console")
    async def models(request: Request) -> Response:
        r = await call_api(request, "GET", "/v1/models")
        return await page(request, "models.html", api=r, models=r.items("data"))

    @public
    @api("Console: its script and style sheet", streams={"text/javascript": "script", "text/css": "styles"},
         errors=(404,), tag="console")
    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise NotFound("no such console file", code=CoreCode.NOT_FOUND)
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})

    return [
        Route("/", home, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/password", password_page, methods=["GET"]),
        Route("/password", password_post, methods=["POST"]),
        Route("/totp", totp_page, methods=["GET"]),
        Route("/totp", totp_post, methods=["POST"]),
        Route("/usage", usage, methods=["GET"]),
        Route("/users", users, methods=["GET"]),
        Route("/users", users_create, methods=["POST"]),
        Route("/users/{name}/roles", users_roles, methods=["POST"]),
        Route("/users/{name}/{action}", users_action, methods=["POST"]),
        Route("/roles", roles, methods=["GET"]),
        Route("/keys", keys, methods=["GET"]),
        Route("/keys", keys_create, methods=["POST"]),
        Route("/keys/{id}/revoke", keys_revoke, methods=["POST"]),
        Route("/groups", groups, methods=["GET"]),
        Route("/groups", groups_create, methods=["POST"]),
        Route("/audit", audit, methods=["GET"]),
        Route("/audit/verify", audit_verify, methods=["POST"]),
        Route("/audit/chains", audit_chains, methods=["GET"]),
        Route("/audit/export", audit_export, methods=["GET"]),
        Route("/overview", overview, methods=["GET"]),
        Route("/overview/data", overview_data, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        *sysadmin_routes(page),
        *secadmin_routes(page),
        *selfservice_routes(page),
    ]


def _cell(v: Any) -> str:
    """A CSV cell: JSON for structures; a leading =+-@ is quoted so spreadsheets do not run it."""
    text = "" if v is None else (v if isinstance(v, str) else dumps(v).decode())
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
