"""Authorization fails closed: every route declares its permission (the app refuses to build
otherwise), `authorize` without an authorizer raises, and the allow-all authorizer is chosen by
`[security] enabled = false` alone."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from xcstack.app import XCStackApp, create_app
from xcstack.config import load_settings
from xcstack.security.authz import SecurityAuthorizer
from xcstack.security.guard import (
    AllowAll,
    NoAuthorizer,
    UndeclaredPermission,
    authorize,
    declaration_of,
    permission_of,
    public,
    requires,
    requires_route,
)

SECURITY = "xcstack.security.capability"


@requires("demo", "read")
async def declared(request: Request) -> Response:
    await authorize(request, "collection:docs", "read")
    return JSONResponse({"ok": True})


async def undeclared(request: Request) -> Response:
    return JSONResponse({"ok": True})


class HalfDeclared(HTTPEndpoint):
    @public
    async def get(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def post(self, request: Request) -> Response:  # no mark
        return JSONResponse({"ok": True})


class _Cap:
    name = "guard-demo"

    def __init__(self, routes: list[Route]) -> None:
        self._routes = routes

    def routes(self) -> list[Route]:
        return self._routes

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"


def _module(name: str, routes: list[Route]) -> str:
    mod = types.ModuleType(name)
    mod.create = lambda ctx: _Cap(routes)  # type: ignore[attr-defined]
    sys.modules[name] = mod
    return name


def _settings(data_dir: Path, **security: Any) -> Any:
    return load_settings(None, data_dir=data_dir, security={"pbkdf2_iterations": 100_000, **security})


def test_a_route_without_a_declaration_fails_the_build_naming_it(data_dir: Path) -> None:
    mod = _module("xc_test_guard_undeclared", [Route("/v1/ok", declared), Route("/v1/undeclared", undeclared),
                                                 Route("/v1/half", HalfDeclared)])
    with pytest.raises(UndeclaredPermission) as err:
        create_app(_settings(data_dir, enabled=False), [mod])
    text = str(err.value)
    assert "/v1/undeclared (undeclared)" in text
    assert "/v1/half (HalfDeclared: POST)" in text  # the class endpoint's undeclared handler
    assert "/v1/ok" not in text
    # with the security capability as well: the same refusal
    with pytest.raises(UndeclaredPermission, match="/v1/undeclared"):
        create_app(_settings(data_dir), [SECURITY, mod])


async def test_authorize_without_an_authorizer_raises() -> None:
    request = Request({"type": "http", "method": "GET", "path": "/x", "headers": []})
    with pytest.raises(NoAuthorizer):
        await authorize(request, "collection:docs", "read")


def test_marks() -> None:
    assert permission_of(declared) == ("demo", "read")
    assert permission_of(HalfDeclared) is None and declaration_of(HalfDeclared, "HEAD") == declaration_of(
        HalfDeclared, "GET")
    assert declaration_of(HalfDeclared, "POST") is None
    route = requires_route(undeclared)
    decl = declaration_of(route)
    assert decl is not None and decl.resolve("/v1/x/{id}", "DELETE") == ("route:/v1/x/{id}", "delete")


def test_allow_all_only_when_security_is_disabled(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    mod = _module("xc_test_guard_declared", [Route("/v1/ok", declared)])
    # enabled: the security capability's authorizer, and the route needs a token
    xc = XCStackApp(_settings(data_dir), [SECURITY, mod])
    assert isinstance(xc.authorizer(), SecurityAuthorizer)
    with TestClient(create_app(_settings(data_dir), [SECURITY, mod])) as c:
        assert c.get("/v1/ok").status_code == 401
    # enabled, but the security capability gave no authorizer: refused, never allow-all
    xc.capabilities = [cap for cap in xc.capabilities if cap.name != "security"]
    with pytest.raises(RuntimeError, match="no authorizer"):
        xc.authorizer()
    # disabled in config: allow-all, said loudly; route checks and `authorize` pass
    with caplog.at_level(logging.WARNING, logger="xcstack.app"):
        app = create_app(_settings(data_dir, enabled=False), [SECURITY, mod])
    assert isinstance(app.state.xc.authorizer(), AllowAll)
    assert any("SECURITY DISABLED" in r.getMessage() for r in caplog.records)
    with TestClient(app) as c:
        assert c.get("/v1/ok").json() == {"ok": True}
