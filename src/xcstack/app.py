"""Builds the ASGI app: core routes (health, readiness, metrics), every capability's routes and
services, the error model and the observability middleware. The only module that knows them all."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack import apiref, openapi
from xcstack.apidoc import api
from xcstack.capability import CAPABILITY_MODULES, AppContext, Capability
from xcstack.config import Settings
from xcstack.errors import HTTP_ERROR, XCError
from xcstack.httputil import JSONResponse, probe_body
from xcstack.observability.looplag import LoopLagMonitor
from xcstack.observability.metrics import render
from xcstack.observability.middleware import ObservabilityMiddleware
from xcstack.state.store import StateStore

log = logging.getLogger("xcstack.app")

READY_TIMEOUT_S = 2.0

_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "payload_too_large"),
}
_HEALTH = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
_READY = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "checks": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["ready"],
            "properties": {"ready": {"type": "boolean"}, "detail": {"type": "string"}}}},
    },
}


def error_response(exc: XCError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


async def _xc_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, XCError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    etype, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", HTTP_ERROR))
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method of the path, not only those of the first route matched
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return JSONResponse(
        {"error": {"type": etype, "code": code, "message": message}},
        status_code=exc.status_code,
        headers=headers,
    )


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        if isinstance(route, Route) and route.methods and route.path_regex.match(request.url.path):
            methods |= route.methods
    return sorted(methods)


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    rid = request.scope.get("xc.request_id", "")
    return JSONResponse(
        {"error": {"type": "server_error", "code": "internal_error",
                   "message": f"internal error (request id {rid})"}},
        status_code=500,
        headers={"X-Request-Id": rid},
    )


class XCStackApp:
    """The capabilities of one http worker and the core endpoints around them."""

    def __init__(self, settings: Settings, capability_modules: Sequence[str] | None = None) -> None:
        self.settings = settings
        url = settings.state.url.get_secret_value() if settings.state.url else None
        self.ctx = AppContext(
            settings=settings, state=StateStore(url, settings.data_dir, settings.state.pool_size)
        )
        self.lag = LoopLagMonitor(settings.observability.loop_lag_interval_s)
        self.ctx.provide("loop_lag", self.lag)
        self.capabilities: list[Capability] = []
        modules = [*CAPABILITY_MODULES, *settings.server.plugins] if capability_modules is None else capability_modules
        for name in modules:
            cap = importlib.import_module(name).create(self.ctx)
            if cap is not None:
                self.capabilities.append(cap)

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        for cap in self.capabilities:
            routes.extend(cap.routes())
        routes.extend(apiref.build_routes(lambda: self.openapi(routes)))
        return routes

    def openapi(self, routes: Sequence[BaseRoute]) -> dict[str, Any]:
        """The OpenAPI document of this app's routes (see openapi.py)."""
        from importlib.metadata import version

        security = [c for c in self.capabilities if c.name == "security"]
        public: list[tuple[str, str]] = [("*", p) for p in apiref.public_paths()]
        self_service: frozenset[str] = frozenset()
        if security:
            from xcstack.security.middleware import PUBLIC_ROUTES, SELF_SERVICE

            self_service = SELF_SERVICE

            sec = self.settings.security
            public += [("*", p) for p in sec.public_paths] + list(PUBLIC_ROUTES)
            if sec.metrics_public:
                public.append(("*", "/metrics"))
        return openapi.build_document(
            routes, title="xcstack", version=version("xcstack"), public=public, security_on=bool(security),
            self_service=self_service,
            description="OpenAI-compatible gateway, KServe v2 inference, vector search, the domestic DB bridge, "
                        "国密 crypto and MLPS L3 security. Errors are JSON `{\"error\": {type, code, message}}`.")

    def middleware(self) -> list[Middleware]:
        obs = self.settings.observability
        stack = [
            Middleware(
                ObservabilityMiddleware,
                max_body_bytes=self.settings.server.max_body_bytes,
                log_access=obs.access_log,
                server=self.settings.server,
            )
        ]
        for cap in self.capabilities:
            extra = getattr(cap, "middleware", None)
            if extra is not None:
                stack.extend(extra())
        return stack

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.lag.start()
        started: list[Capability] = []
        try:
            for cap in self.capabilities:
                await cap.start()
                started.append(cap)
            yield
        finally:
            for cap in reversed(started):
                try:
                    await cap.stop()
                except Exception:
                    log.exception("stopping capability %s failed", cap.name)
            await self.lag.stop()
            await self.ctx.state.close()

    @api("Liveness: the worker answers", response=_HEALTH, tag="core")
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @api("Readiness of every capability (details only for an authenticated caller)", response=_READY,
         also={503: _READY}, tag="core")
    async def readyz(self, request: Request) -> Response:
        checks = await asyncio.gather(*(self._ready(cap) for cap in self.capabilities))
        details: dict[str, Any] = {name: probe_body(request.scope, ok, detail) for name, ok, detail in checks}
        ready = all(ok for _, ok, _ in checks)
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": details},
            status_code=200 if ready else 503,
        )

    async def _ready(self, cap: Capability) -> tuple[str, bool, str]:
        try:
            ok, detail = await asyncio.wait_for(cap.ready(), READY_TIMEOUT_S)
        except TimeoutError:
            return cap.name, False, f"readiness check timed out after {READY_TIMEOUT_S}s"
        except Exception as exc:
            return cap.name, False, f"readiness check failed: {exc!r}"
        return cap.name, ok, detail

    @api("Prometheus metrics", streams={"text/plain": "Prometheus exposition format"}, tag="core")
    async def metrics(self, request: Request) -> Response:
        body, content_type = render()
        return Response(body, media_type=content_type)


def create_app(settings: Settings, capability_modules: Sequence[str] | None = None) -> Starlette:
    """The ASGI app of one http worker; `capability_modules` defaults to all of them."""
    xc = XCStackApp(settings, capability_modules)
    app = Starlette(
        routes=xc.routes(),
        middleware=xc.middleware(),
        exception_handlers={XCError: _xc_error, HTTPException: _http_error, Exception: _unhandled},
        lifespan=xc.lifespan,
    )
    app.state.xc = xc
    return app
