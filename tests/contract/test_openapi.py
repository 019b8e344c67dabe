"""The OpenAPI 3.1 document: complete (every route and method of the full app, each with its contract),
valid, honest about permissions and error codes, and served with its reference page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.openapi import error_codes
from xcstack.security.guard import permission_of

DOCS = Path(__file__).resolve().parents[2] / "docs"


def full_settings(data_dir: Path) -> Any:
    """Every capability on, as `xcstack serve` has them (a database and an upstream configured)."""
    return load_settings(
        None, data_dir=data_dir,
        security={"pbkdf2_iterations": 100_000},
        crypto={"access": "direct"},
        gateway={"upstreams": [{"name": "never", "base_url": "http://127.0.0.1:9/v1", "models": ["mock-model"]}]},
        inference={"mode": "inline"},
        vector={"backend": "milvus", "milvus": {"lite_mode": "in_process"}},
        db={"databases": {"main": {"driver": "sqlite", "dsn": str(data_dir / "c.sqlite"), "pool_size": 1,
                                   "queries": {"hello": {"sql": "SELECT 'hi' AS greeting"}}}}},
    )


@pytest.fixture(scope="module")
def app_and_doc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    app = create_app(full_settings(tmp_path_factory.mktemp("oa")))
    return app, app.state.xc.openapi(app.routes)


def test_document_is_valid_openapi_31(app_and_doc: tuple[Any, dict[str, Any]]) -> None:
    _, doc = app_and_doc
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on an invalid document


def test_every_route_and_method_is_documented_with_its_contract(app_and_doc: tuple[Any, dict[str, Any]]) -> None:
    app, doc = app_and_doc
    served = {(m.lower(), r.path_format) for r in app.routes if isinstance(r, Route)
              for m in (r.methods or ()) if m != "HEAD"}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served - documented == set(), "routes missing from the document"
    assert documented - served == set(), "documented operations the app does not serve"
    bare = sorted(f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m, op in ops.items()
                  if op.get("x-xc-undocumented"))
    assert bare == [], f"routes without an @api contract: {bare}"
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), "operationIds must be unique (generated clients name methods after them)"


def test_permissions_and_security_schemes(app_and_doc: tuple[Any, dict[str, Any]]) -> None:
    app, doc = app_and_doc
    assert set(doc["components"]["securitySchemes"]) == {"session", "apiKey"}
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        perm = permission_of(route.endpoint)
        for method in route.methods or ():
            if method == "HEAD":
                continue
            op = doc["paths"][route.path_format][method.lower()]
            if perm is not None:
                assert op["x-xc-permission"] == f"{perm[0]}:{perm[1]}", (method, route.path)
                assert op["x-xc-permission"] in op["description"]
    login = doc["paths"]["/v1/auth/login"]["post"]
    assert login["security"] == [] and login["x-xc-permission"] == "public"
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/v1/security/users"]["get"]  # the global bearer schemes apply
    assert doc["paths"]["/v1/security/users"]["get"]["x-xc-permission"] == "security.user:read"


def _documented_codes() -> set[str]:
    """The codes of every error table in docs/ (rows like `| 400 | `code` / `other` | when |`)."""
    codes: set[str] = set()
    for md in DOCS.glob("*.md"):
        for line in md.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 2 and re.fullmatch(r"[45]\d\d", cells[0]):
                codes |= set(re.findall(r"`([a-z][a-z0-9_]+)`", cells[1]))
                codes |= set(re.findall(r"[45]\d\d `([a-z][a-z0-9_]+)`", line))
    return codes


def test_every_documented_error_code_is_in_the_schema(app_and_doc: tuple[Any, dict[str, Any]]) -> None:
    _, doc = app_and_doc
    documented = _documented_codes()
    assert len(documented) > 30  # the tables were found
    enum = set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    assert documented - enum == set(), "codes in docs/ that the source never raises (or the schema misses)"
    assert set(error_codes()) <= enum


def test_error_code_collection_finds_every_form(tmp_path: Path) -> None:
    """The collector reads the three forms codes are written in; a raised literal it missed would make
    the fuzzer's schema check fail on a real response."""
    codes = set(error_codes())
    assert {"invalid_json", "model_not_found"} <= codes  # gateway protocol constants
    assert {"internal_error", "rate_limited"} <= codes  # class attributes (annotated and plain)
    assert {"invalid_totp", "unknown_query"} <= codes  # code="..." arguments
    assert {"method_not_allowed", "password_change_required", "totp_enrollment_required"} <= codes


def test_openapi_json_and_docs_are_served_publicly(tmp_path: Path) -> None:
    app = create_app(full_settings(tmp_path))
    with TestClient(app) as c:
        r = c.get("/openapi.json")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json()["paths"]["/v1/chat/completions"]["post"]["operationId"] == "post_v1_chat_completions"
        page = c.get("/docs")
        assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
        assert "<script>" not in page.text  # no inline script: the CSP forbids it
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
        js = c.get("/docs/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000 and js.headers["content-type"].startswith(
            "text/javascript")
        # a method the route lacks: 405 with every method of the path, after authentication, never 403
        assert c.request("TRACE", "/docs").status_code == 401
        token = _admin_token(c)
        r = c.request("PATCH", "/v1/security/users", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
        assert r.json()["error"]["code"] == "method_not_allowed"


def _admin_token(c: TestClient) -> str:
    from xcstack.security.service import SYSTEM

    svc = next(cap for cap in c.app.state.xc.capabilities if cap.name == "security").service  # type: ignore[attr-defined]

    async def setup() -> None:
        await svc.create_user(SYSTEM, "oa-admin", ["sysadmin"], kind="service", password="Docs-Check-Pass-2024!")

    assert c.portal is not None
    c.portal.call(setup)
    r = c.post("/v1/auth/login", json={"username": "oa-admin", "password": "Docs-Check-Pass-2024!"})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])
