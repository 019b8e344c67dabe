"""HTTP adapter of the usage capability.

  GET /v1/usage            the caller's usage (any authenticated principal); `scope=all`: everyone's (usage:read)
  GET /v1/quotas           the quotas that apply to the caller, with use and reset time; `scope=all`: every rule
  POST /v1/quotas          add a quota                                         usage.quota:write
  DELETE /v1/quotas/{id}   remove a quota added through the API                usage.quota:write
"""

from __future__ import annotations

import csv
import io
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.errors import BadRequest, CoreCode
from xcstack.httputil import JSONResponse, parse_model, read_model
from xcstack.security.guard import audit, authenticated, authorize, requires
from xcstack.usage import protocol as p
from xcstack.usage.quotas import caller_of
from xcstack.usage.service import GROUP_BY, UsageService, quota_rule

CSV_FIELDS = ("period", *GROUP_BY, "requests", "input_tokens", "output_tokens", "cost", "estimated")


def _csv(rows: list[dict[str, Any]], group_by: list[str]) -> str:
    out = io.StringIO()
    fields = ["period", *group_by, "requests", "input_tokens", "output_tokens", "cost", "estimated"]
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def build_routes(svc: UsageService) -> list[BaseRoute]:
    @authenticated
    @api("Usage from the ledger: requests, tokens and cost per period, optionally per key, user, group, model "
         "or upstream", query=p.UsageQuery, response=p.UsageReport,
         streams={"text/csv": "the same rows as CSV (`format=csv` or `Accept: text/csv`)"},
         checks="`scope=all` needs `usage:read`; otherwise the caller's own usage (its user's calls).",
         description="Bad input answers 400: `invalid_period` (a malformed `from`/`to`), `invalid_range` (from "
                     "after to), `range_too_large`, `unknown_group`.")
    async def usage(request: Request) -> Response:
        q = parse_model(dict(request.query_params), p.UsageQuery)
        group_by = [g.strip() for g in q.group_by.split(",") if g.strip()]
        bad = [g for g in group_by if g not in GROUP_BY]
        if bad or len(set(group_by)) != len(group_by):
            raise BadRequest(f"group_by: each of {', '.join(GROUP_BY)} at most once (got {q.group_by!r})",
                             code=CoreCode.INVALID_PARAMETER, param="group_by")
        t0, t1 = svc.parse_range(q.from_, q.to, q.granularity)
        user: str | None = None
        if q.scope == "all":
            await authorize(request, "usage", "read")
        else:
            user = caller_of(request.scope).user
        if q.group is not None and svc.directory is not None and not await svc.directory.group_exists(q.group):
            raise BadRequest(f"no group {q.group!r}", code=p.UsageCode.UNKNOWN_GROUP, param="group")
        rows = await svc.report(t0, t1, q.granularity, group_by, user, q.group)
        want_csv = q.format == "csv" or (q.format is None and "text/csv" in request.headers.get("accept", ""))
        if want_csv:
            return Response(_csv(rows, group_by), media_type="text/csv; charset=utf-8")
        return JSONResponse({"from": svc.calendar.iso(t0), "to": svc.calendar.iso(t1), "granularity": q.granularity,
                             "group_by": group_by, "currency": svc.prices.currency,
                             "timezone": svc.settings.timezone, "rows": rows})

    @authenticated
    @api("Quotas: those that apply to the caller with what it used and when each resets, or every rule",
         query=p.QuotaQuery, response=p.QuotaList, checks="`scope=all` needs `usage:read`.")
    async def quotas(request: Request) -> Response:
        q = parse_model(dict(request.query_params), p.QuotaQuery)
        if q.scope == "all":
            await authorize(request, "usage", "read")
            items = await svc.quota_view(None)
        else:
            items = await svc.quota_view(caller_of(request.scope))
        return JSONResponse({"quotas": items, "timezone": svc.settings.timezone, "currency": svc.prices.currency})

    @requires("usage.quota", "write")
    @api("Add a quota (per key, user or group; requests, tokens or cost per day or month; hard or soft)",
         body=p.QuotaCreate, response=p.QuotaCreated, status=201,
         description="400 `invalid_quota` for a negative limit, `unknown_group` / `unknown_subject` for a group or "
                     "user that does not exist. Audited (`usage.quota_create`).")
    async def add_quota(request: Request) -> Response:
        body = await read_model(request, p.QuotaCreate)
        rule = quota_rule(body)
        principal = request.scope.get("xc.principal")
        qid = await svc.add_quota(rule, str(getattr(principal, "name", "anonymous")))
        await audit(request, "usage.quota_create", f"quota:{qid}", "success", body.model_dump())
        return JSONResponse({"id": qid}, status_code=201)

    @requires("usage.quota", "write")
    @api("Remove a quota added through the API", response=p.QuotaCreated, errors=(404,),
         description="404 `quota_not_found`; quotas from the config file are changed there. Audited.")
    async def delete_quota(request: Request) -> Response:
        qid = request.path_params["qid"]
        await svc.delete_quota(qid)
        await audit(request, "usage.quota_delete", f"quota:{qid}", "success")
        return JSONResponse({"id": qid})

    return [
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/v1/quotas", quotas, methods=["GET"]),
        Route("/v1/quotas", add_quota, methods=["POST"]),
        Route("/v1/quotas/{qid}", delete_quota, methods=["DELETE"]),
    ]
