"""The system administrator's console pages beyond the overview: vector collections, named DB
queries, async jobs, 国密 keys and a playground for chat / embeddings / rerank.

Like every console page, each one carries the permission mark of the API calls it makes and then
makes those calls through the API as the caller (`web.call_api`): the API authorizes and audits
each of them again. A form that runs something (a search, a query, a playground call) is a POST with
the CSRF token, as every cookie-authenticated POST of the console.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.console.web import HTML, Page, call_api, can, check_csrf, read_form, seg
from xcstack.security.guard import requires

PLAY_KINDS = ("chat", "embeddings", "rerank")
MAX_RESULT_ROWS = 200  # rows a console table shows (the API's own limits apply before this)


def parse_vector(text: str) -> list[float] | None:
    """A vector typed as JSON (`[0.1, 0.2]`) or as numbers separated by commas/spaces; None if not one."""
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text) if text.startswith("[") else [float(x) for x in text.replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError):
        return None
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in value):
        return [float(x) for x in value]
    return None


def param_value(spec: dict[str, Any], raw: str) -> Any:
    """A form field as the named query's parameter type (the API validates it again)."""
    kind = spec.get("type", "str")
    raw = raw.strip()
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.lower() in ("1", "true", "yes", "on")
    except ValueError:
        return raw  # the API answers 400 invalid_parameter with its reason
    return raw


def sysadmin_routes(page: Page) -> list[BaseRoute]:
    """The routes, relative to the /console mount; `page(request, template, status, **ctx)` renders."""

    # -- vector collections ------------------------------------------------------------------------
    async def vectors_view(request: Request, name: str | None, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/vectors/collections")
        shown, info = r, None
        if name and r.ok:
            shown = await call_api(request, "GET", f"/v1/vectors/collections/{seg(name)}")
            info = shown.json() if shown.ok else None
        return await page(request, "vectors.html", status, api=shown, collections=r.items("data"), name=name,
                          info=info, **ctx)

    @requires("vector", "read")
    @api("Console: vector collections (list, describe)", streams=HTML, tag="console")
    async def vectors(request: Request) -> Response:
        return await vectors_view(request, request.query_params.get("name") or None)

    @requires("vector", "read")
    @api("Console: search a vector collection (a text, embedded by the local model, or a vector)", streams=HTML,
         tag="console")
    async def vectors_search(request: Request) -> Response:
        name = seg(request.path_params["name"])
        form = await read_form(request)
        await check_csrf(request, form)
        top_k = int(form["top_k"]) if form.get("top_k", "").strip().isdigit() else 10
        body: dict[str, Any] = {"top_k": top_k, "output_fields": ["*"]}
        vec = parse_vector(form.get("vector", ""))
        if vec is not None:
            body["vector"] = vec
        else:
            body["text"] = form.get("text", "")
        r = await call_api(request, "POST", f"/v1/vectors/{name}/search", json=body)
        return await vectors_view(request, name, 200 if r.ok else r.status, hits=r.items("data")[:MAX_RESULT_ROWS],
                                  searched=True, form=form, api_error=r.problem)

    # -- named DB queries ----------------------------------------------------------------------------
    async def db_view(request: Request, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/db")
        return await page(request, "db.html", status, api=r, databases=r.items("databases"), **ctx)

    @requires("db", "query")
    @api("Console: databases and their named queries", streams=HTML, tag="console")
    async def db(request: Request) -> Response:
        return await db_view(request)

    async def contract(request: Request) -> tuple[str, str, Any]:
        database, query = seg(request.path_params["database"]), seg(request.path_params["query"])
        return database, query, await call_api(request, "GET", f"/v1/db/{database}/{query}")

    @requires("db", "query")
    @api("Console: a named query's contract and a form to run it", streams=HTML, tag="console")
    async def db_query(request: Request) -> Response:
        database, query, c = await contract(request)
        return await db_view(request, 200 if c.ok else c.status, contract=c.json() if c.ok else None,
                             api_error=c.problem, database=database, query=query, form={})

    @requires("db", "query")
    @api("Console: run a named query with parameters (the rows as a table)", streams=HTML, tag="console")
    async def db_run(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        database, query, c = await contract(request)
        if not c.ok:
            return await db_view(request, c.status, api_error=c.error, database=database, query=query, form=form)
        spec = (c.json() or {}).get("params", {})
        params = {k: param_value(s, form[f"p.{k}"]) for k, s in spec.items()
                  if form.get(f"p.{k}", "").strip() != ""}
        r = await call_api(request, "POST", f"/v1/db/{database}/{query}", json={"params": params})
        return await db_view(request, 200 if r.ok else r.status, contract=c.json(), database=database, query=query,
                             form=form, result=r.json() if r.ok else None, api_error=r.problem,
                             max_rows=MAX_RESULT_ROWS)

    # -- async jobs ---------------------------------------------------------------------------------
    async def jobs_view(request: Request, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/jobs")
        return await page(request, "jobs.html", status, api=r, jobs=r.items("data"),
                          may_cancel=await can(request, "route:/v1/jobs/{job_id}", "delete"), **ctx)

    @requires("route:/v1/jobs", "get")
    @api("Console: the caller's async jobs", streams=HTML, tag="console")
    async def jobs(request: Request) -> Response:
        return await jobs_view(request)

    @requires("route:/v1/jobs/{job_id}", "delete")
    @api("Console: cancel one of the caller's async jobs", streams=HTML, tag="console")
    async def jobs_cancel(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        r = await call_api(request, "DELETE", f"/v1/jobs/{seg(request.path_params['id'])}")
        return await jobs_view(request, **r.outcome())

    # -- 国密 keys ---------------------------------------------------------------------------------------
    @requires("crypto", "list")
    @api("Console: the 国密 (SM2/SM4/HMAC-SM3) keys, no key material", streams=HTML, tag="console")
    async def crypto_keys(request: Request) -> Response:
        return await crypto_view(request, request.query_params.get("name") or None)

    async def crypto_view(request: Request, name: str | None, status: int = 200, **ctx: Any) -> Response:
        r = await call_api(request, "GET", "/v1/crypto/keys")
        info = None
        if name and r.ok:
            d = await call_api(request, "GET", f"/v1/crypto/keys/{seg(name)}")
            info = d.json() if d.ok else None
        return await page(request, "crypto.html", status, api=r, keys=r.items("keys"), name=name, info=info,
                          may_rotate=await can(request, "crypto", "rotate"), **ctx)

    @requires("crypto", "rotate")
    @api("Console: rotate a 国密 key (a new version; older ones stay for verify/decrypt)", streams=HTML,
         tag="console")
    async def crypto_rotate(request: Request) -> Response:
        await check_csrf(request, await read_form(request))
        name = request.path_params["name"]
        r = await call_api(request, "POST", f"/v1/crypto/keys/{seg(name)}/rotate")
        return await crypto_view(request, name if r.ok else None, **r.outcome("rotated"))

    # -- playground ---------------------------------------------------------------------------------------
    async def play_view(request: Request, status: int = 200, **ctx: Any) -> Response:
        m = await call_api(request, "GET", "/v1/models")
        return await page(request, "playground.html", status, kinds=PLAY_KINDS,
                          models=[x.get("id", "") for x in m.items("data")], **ctx)

    @requires("route:/v1/models", "get")
    @api("Console: playground (chat, embeddings, rerank) against the served models", streams=HTML, tag="console")
    async def playground(request: Request) -> Response:
        return await play_view(request, form={"kind": "chat"})

    @requires("route:/v1/models", "get")
    @api("Console: run one playground call (the answer shown as text)", streams=HTML, tag="console")
    async def playground_run(request: Request) -> Response:
        form = await read_form(request)
        await check_csrf(request, form)
        kind = form.get("kind") if form.get("kind") in PLAY_KINDS else "chat"
        model, text = form.get("model", ""), form.get("input", "")
        if kind == "chat":
            r = await call_api(request, "POST", "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": text}], "stream": False})
        elif kind == "embeddings":
            r = await call_api(request, "POST", "/v1/embeddings", json={"model": model, "input": text})
        else:
            docs = [x.strip() for x in form.get("documents", "").splitlines() if x.strip()]
            r = await call_api(request, "POST", "/v1/rerank", json={"model": model, "query": text, "documents": docs})
        out: dict[str, Any] = {}
        if r.ok:
            body = r.json() or {}
            if kind == "chat":
                choice = (body.get("choices") or [{}])[0]
                out = {"text": str((choice.get("message") or {}).get("content") or ""), "usage": body.get("usage")}
            elif kind == "embeddings":
                emb = ((body.get("data") or [{}])[0]).get("embedding") or []
                out = {"dimension": len(emb), "head": [round(float(x), 6) for x in emb[:8]], "usage": body.get("usage")}
            else:
                out = {"results": (body.get("results") or [])[:MAX_RESULT_ROWS]}
        return await play_view(request, 200 if r.ok else r.status, form={**form, "kind": kind}, kind=kind, out=out,
                               api_error=r.problem)

    return [
        Route("/vectors", vectors, methods=["GET"]),
        Route("/vectors/{name}/search", vectors_search, methods=["POST"]),
        Route("/db", db, methods=["GET"]),
        Route("/db/{database}/{query}", db_query, methods=["GET"]),
        Route("/db/{database}/{query}", db_run, methods=["POST"]),
        Route("/jobs", jobs, methods=["GET"]),
        Route("/jobs/{id}/cancel", jobs_cancel, methods=["POST"]),
        Route("/crypto", crypto_keys, methods=["GET"]),
        Route("/crypto/{name}/rotate", crypto_rotate, methods=["POST"]),
        Route("/playground", playground, methods=["GET"]),
        Route("/playground", playground_run, methods=["POST"]),
    ]
