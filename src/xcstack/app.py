"""Builds the ASGI app: core routes (health, readiness, metrics), every capability's routes and
services, the error model and the observability middleware. The only module that knows them all.

Every route's ASGI app is wrapped in its permission check here (`security.guard.Guarded`), with the
authorizer the app was built with: the security capability's, or `AllowAll` when
`[security] enabled = false`. A route that declares no permission fails the build.

Composition: each capability module declares the `Services` it provides, needs and uses
(`capability.Wiring`); they are created providers first (`order_modules`), and a cycle, a name
provided twice or a need nobody provides stops the start naming them. Who serves `/v1/embeddings`
is decided here, once (`embeddings_owner`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from xcstack import apiref
from xcstack.apidoc import api
from xcstack.capability import CAPABILITY_MODULES, AppContext, Capability, Services, Wiring
from xcstack.config import Settings
from xcstack.errors import CoreCode, XCError
from xcstack.httputil import JSONResponse, probe_body
from xcstack.observability.looplag import LoopLagMonitor
from xcstack.observability.metrics import render
from xcstack.observability.middleware import ObservabilityMiddleware
from xcstack.security.guard import (
    AllowAll,
    Authorizer,
    Guarded,
    UndeclaredPermission,
    declaration_of,
    requires_route,
    undeclared_handlers,
)
from xcstack.state.store import StateStore
from xcstack.system.routes import build_routes as system_routes

log = logging.getLogger("xcstack.app")

READY_TIMEOUT_S = 2.0
SECURITY_MODULE = "xcstack.security.capability"
GATEWAY_MODULE = "xcstack.gateway.capability"

_HTTP_CODES = {
    400: ("invalid_request_error", CoreCode.BAD_REQUEST),
    401: ("authentication_error", CoreCode.UNAUTHORIZED),
    403: ("permission_error", CoreCode.FORBIDDEN),
    404: ("not_found_error", CoreCode.NOT_FOUND),
    405: ("invalid_request_error", CoreCode.METHOD_NOT_ALLOWED),
    408: ("invalid_request_error", CoreCode.REQUEST_TIMEOUT),
    413: ("invalid_request_error", CoreCode.PAYLOAD_TOO_LARGE),
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
    etype, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", CoreCode.HTTP_ERROR))
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
        {"error": {"type": "server_error", "code": CoreCode.INTERNAL_ERROR,
                   "message": f"internal error (request id {rid})"}},
        status_code=500,
        headers={"X-Request-Id": rid},
    )


@runtime_checkable
class AuthorizerProvider(Protocol):
    """A capability that decides who may call what (the security capability)."""

    def route_authorizer(self) -> Authorizer: ...


# The data-plane paths nearly every request takes. Starlette tries routes in order, so they go first:
# behind ~50 administrative routes the chat route cost ~8% of the gateway's request CPU in matching.
HOT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank")


def hot_first(routes: list[BaseRoute]) -> list[BaseRoute]:
    """`routes` with the literal hot paths moved to the front, the rest in order. Safe: a literal path
    matched earlier can only shadow a later route for that same literal path, and each is declared once."""
    hot = [r for p in HOT_PATHS for r in routes if isinstance(r, Route) and r.path == p]
    return hot + [r for r in routes if not any(r is h for h in hot)]


def guard_routes(routes: Sequence[BaseRoute], authorizer: Authorizer, prefix: str = "") -> None:
    """Wrap every route's ASGI app (through Mounts) in its permission check; raise
    UndeclaredPermission naming every route without a declaration."""
    missing: list[str] = []
    _guard(routes, authorizer, prefix, missing)
    if missing:
        raise UndeclaredPermission(
            "routes without a permission declaration (mark them @requires(resource, action), @requires_route, "
            "@public or @authenticated; see security/guard.py): " + "; ".join(missing))


def _guard(routes: Sequence[BaseRoute], authorizer: Authorizer, prefix: str, missing: list[str]) -> None:
    for route in routes:
        if isinstance(route, Mount):
            inner = list(route.routes)
            if inner:
                _guard(inner, authorizer, prefix + route.path, missing)
                continue
            endpoint, template, methods = route.app, prefix + route.path + "/{path:path}", "*"
        elif isinstance(route, (Route, WebSocketRoute)):
            endpoint, template = route.endpoint, prefix + route.path
            methods = ",".join(sorted(getattr(route, "methods", None) or ())) or "*"
        else:
            missing.append(f"{type(route).__name__} {getattr(route, 'path', route)!r} (not a Route or Mount)")
            continue
        undeclared = undeclared_handlers(endpoint)
        if undeclared:
            where = f"{methods} {template} ({getattr(endpoint, '__qualname__', type(endpoint).__qualname__)}"
            missing.append(where + (f": {', '.join(undeclared)})" if undeclared != ["*"] else ")"))
            continue
        base = route.app.app if isinstance(route.app, Guarded) else route.app  # a route built into another app
        route.app = Guarded(base, endpoint, template, authorizer)


class CompositionError(RuntimeError):
    """The capabilities of an app do not fit together (raised at start, naming what does not fit)."""


def embeddings_owner(settings: Settings, modules: Sequence[str]) -> str:
    """Who serves `/v1/embeddings`: the gateway when it is on (upstream models there, local ones handed
    to `Services.local_embedder`), else the inference capability. The one place that decides it."""
    return "gateway" if GATEWAY_MODULE in modules and settings.gateway.enabled else "inference"


def wiring_of(module: ModuleType) -> Wiring:
    declared = getattr(module, "WIRING", None)
    if declared is None:
        return Wiring()
    if not isinstance(declared, Wiring):
        raise CompositionError(f"{module.__name__}.WIRING is a {type(declared).__name__}, not a capability.Wiring")
    return declared


def order_modules(declared: Sequence[tuple[str, Wiring]]) -> list[str]:
    """The creation order: every provider before the modules that need or use what it provides, the
    listed order otherwise. Raises CompositionError for a name two modules provide, a need no module
    provides, or a cycle (naming the modules and services around it)."""
    providers: dict[str, str] = {}
    for module, w in declared:
        for name in w.provides:
            if name in providers:
                raise CompositionError(f"service {name!r} is provided by both {providers[name]} and {module}")
            providers[name] = module
    deps: dict[str, dict[str, str]] = {}  # module -> {provider module: a service it gets from it}
    for module, w in declared:
        for name in w.needs:
            if name not in providers:
                raise CompositionError(f"{module} needs service {name!r}, which no capability in the app provides "
                                       f"(modules: {', '.join(m for m, _ in declared)})")
        deps[module] = {providers[n]: n for n in (*w.needs, *w.uses) if n in providers and providers[n] != module}
    order: list[str] = []
    pending = [m for m, _ in declared]
    while pending:
        ready = next((m for m in pending if all(d in order for d in deps[m])), None)
        if ready is None:
            raise CompositionError("capability cycle: " + _cycle(pending, deps))
        order.append(ready)
        pending.remove(ready)
    return order


def _cycle(pending: list[str], deps: dict[str, dict[str, str]]) -> str:
    """One cycle among modules that wait on each other, as `a -(service)-> b -(service)-> a`."""
    path = [pending[0]]
    while True:
        nxt = next(d for d in deps[path[-1]] if d in pending)
        if nxt in path:
            loop = [*path[path.index(nxt):], nxt]
            return " ".join(f"{m} -({deps[m][n]})->" for m, n in itertools.pairwise(loop)) + f" {nxt}"
        path.append(nxt)


def create_capability(name: str, module: ModuleType, wiring: Wiring, ctx: AppContext) -> Capability | None:
    """`module.create(ctx)`, held to its declaration: it may set only the services it provides, and an
    enabled capability gets every service it needs."""
    before = {f.name: getattr(ctx.services, f.name) for f in fields(Services)}
    cap: Capability | None = module.create(ctx)
    changed = sorted(n for n, v in before.items() if getattr(ctx.services, n) is not v)
    undeclared = [n for n in changed if n not in wiring.provides]
    if undeclared:
        raise CompositionError(f"{name} set services {', '.join(undeclared)} without declaring them in "
                               "WIRING.provides")
    missing = [n for n in wiring.needs if getattr(ctx.services, n) is None]
    if cap is not None and missing:
        raise CompositionError(f"{name} needs service(s) {', '.join(missing)}, but the capability providing "
                               "them is disabled")
    return cap


class XCStackApp:
    """The capabilities of one http worker and the core endpoints around them."""

    def __init__(self, settings: Settings, capability_modules: Sequence[str] | None = None) -> None:
        self.settings = settings
        modules = [*CAPABILITY_MODULES, *settings.server.plugins] if capability_modules is None else capability_modules
        self.modules = list(modules)
        url = settings.state.url.get_secret_value() if settings.state.url else None
        self.ctx = AppContext(settings=settings, state=StateStore(url, settings.data_dir, settings.state.pool_size),
                              embeddings_owner=embeddings_owner(settings, self.modules))
        self.lag = LoopLagMonitor(settings.observability.loop_lag_interval_s)
        loaded = {name: importlib.import_module(name) for name in self.modules}
        wiring = {name: wiring_of(module) for name, module in loaded.items()}
        created: dict[str, Capability] = {}
        for name in order_modules([(n, wiring[n]) for n in self.modules]):
            cap = create_capability(name, loaded[name], wiring[name], self.ctx)
            if cap is not None:
                created[name] = cap
        # routes, readiness and middleware in the listed order; start providers first, stop users first
        self.capabilities: list[Capability] = [created[n] for n in self.modules if n in created]
        self.start_order: list[Capability] = list(created.values())

    @property
    def services(self) -> Services:
        return self.ctx.services

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            *system_routes(),  # the supervisor's process table (system/)
        ]
        for cap in self.capabilities:
            routes.extend(cap.routes())
        routes.extend(apiref.build_routes(lambda: self.openapi(routes)))
        guard_routes(routes, self.authorizer())
        return hot_first(routes)

    def authorizer(self) -> Authorizer:
        """The security capability's authorizer; `AllowAll` only when `[security] enabled = false`
        says so, or when the app was built without the security capability on purpose (an explicit
        capability list without it: tests, benchmarks). Anything else raises."""
        providers = [c for c in self.capabilities if isinstance(c, AuthorizerProvider)]
        if len(providers) > 1:
            raise RuntimeError(f"more than one authorizer: {[getattr(c, 'name', c) for c in providers]}")
        if providers:
            return providers[0].route_authorizer()
        if not self.settings.security.enabled:
            log.warning("SECURITY DISABLED ([security] enabled = false): every route is open to anyone, "
                        "nothing is authenticated, authorized or audited")
            return AllowAll()
        if SECURITY_MODULE not in self.modules:
            log.warning("app built without the security capability (capability list %s): every route is open",
                        list(self.modules))
            return AllowAll()
        raise RuntimeError("[security] enabled = true but the security capability provides no authorizer")

    def openapi(self, routes: Sequence[BaseRoute]) -> dict[str, Any]:
        """The OpenAPI document of this app's routes (see openapi.py). openapi.py imports every capability's
        protocol models (for the error catalogue): loaded at the first request for the document, not in
        every worker."""
        from importlib.metadata import version

        from xcstack import openapi

        security = [c for c in self.capabilities if c.name == "security"]
        public: list[tuple[str, str]] = [("*", p) for p in apiref.public_paths()]
        self_service: frozenset[str] = frozenset()
        if security:
            from xcstack.security.middleware import PUBLIC_ROUTES

            self_service = frozenset(r.path for r in routes if isinstance(r, Route)
                                     and getattr(declaration_of(r.endpoint), "kind", None) == "authenticated")

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
            for cap in self.start_order:
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
    @requires_route  # public through `[security] public_paths` / `metrics_public`
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @api("Readiness of every capability (details only for an authenticated caller)", response=_READY,
         also={503: _READY}, tag="core")
    @requires_route  # public through `[security] public_paths` / `metrics_public`
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
    @requires_route  # public through `[security] public_paths` / `metrics_public`
    async def metrics(self, request: Request) -> Response:
        body, content_type = await asyncio.to_thread(render)  # every worker's files read and rendered: off the loop
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
