"""The RBAC matrix over EVERY route of the whole app and every kind of principal.

The app is built exactly as `xcstack serve` builds an http worker (`create_app(settings)` with the
default capability list): security, crypto (soft backend, direct access), the gateway (an
upstream that is never called), the DB bridge (SQLite named queries), inference (inline, one tiny
tensor model, so that the readiness probes are 200) and vectors (Milvus Lite in process). Every
route the app really has, for every method but HEAD, must have a row in `MATRIX`; a route without
one fails the test, so a new route cannot slip in without a decision on who may call it.

`MATRIX` is written out by hand from the documented design (docs/security.md "Access control",
"HTTP API"; security/rbac.py), not derived from the code under test:

- sysadmin: everything operational (users, API keys, metrics, every capability's routes), never
  the audit log, never roles or role assignment;
- secadmin: roles, role assignment, reading users; nothing operational, not the audit log;
- auditor: reads and verifies the audit log; nothing else;
- a custom role holding one permission (`crypto:hash`): exactly that route;
- a user with no roles: only the self-service `/v1/auth/*` routes;
- anonymous: only the default public paths (`/healthz`, `/readyz`, and the KServe probes
  `/v2/health/live`, `/v2/health/ready`), `POST /v1/auth/login`, and the API contract
  (`GET /openapi.json`, the `/docs` reference page and its assets).

Each principal calls each route; allowed means neither 401 nor 403 (the requests are built to be
harmless: unknown names answer 404, invalid bodies 400), denied means 403 `forbidden` for an
authenticated principal and 401 `unauthorized` for anonymous. Every denial must have left its own
audit record (found by the request id), and no allowed call may have left a denial record.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.security.audit import record as rec
from xcstack.security.capability import SECRETBOX_KEY, SecurityCapability
from xcstack.security.service import SYSTEM

from .conftest import audit_records

PW = "Matrix-Pass-2024!"

# -- principals --------------------------------------------------------------------------------------
# the principals are user names (the first start's own admin, secadmin, auditor are not used)
SYSADMIN, SECADMIN, AUDITOR, CUSTOM, NOROLES, ANON = "m-sys", "m-sec", "m-aud", "m-custom", "m-noroles", "anon"
AUTHENTICATED = (SYSADMIN, SECADMIN, AUDITOR, CUSTOM, NOROLES)
PRINCIPALS = (*AUTHENTICATED, ANON)
USERS = {SYSADMIN: ["sysadmin"], SECADMIN: ["secadmin"], AUDITOR: ["auditor"], CUSTOM: ["hasher"], NOROLES: []}
CUSTOM_ROLE = ("hasher", [("crypto", "hash")])  # one permission

# who may call a route
PUBLIC = frozenset(PRINCIPALS)
SELF = frozenset(AUTHENTICATED)  # self-service: any authenticated principal
SYS = frozenset({SYSADMIN})
SEC = frozenset({SECADMIN})
AUD = frozenset({AUDITOR})
SYS_SEC = frozenset({SYSADMIN, SECADMIN})
SYS_CUSTOM = frozenset({SYSADMIN, CUSTOM})


@dataclass(frozen=True)
class Call:
    path: str
    body: Any = None
    fresh_token: bool = False  # the call ends the session (logout): use a session of its own


# (method, route template) -> (who may call it, the concrete calls that exercise it)
MATRIX: dict[tuple[str, str], tuple[frozenset[str], list[Call]]] = {
    # core
    ("GET", "/healthz"): (PUBLIC, [Call("/healthz")]),
    ("GET", "/readyz"): (PUBLIC, [Call("/readyz")]),
    ("GET", "/metrics"): (SYS, [Call("/metrics")]),
    ("GET", "/v1/system/processes"): (SYS, [Call("/v1/system/processes")]),  # system:read
    # the API contract and its reference page: public, like the login (clients generate code from it)
    ("GET", "/openapi.json"): (PUBLIC, [Call("/openapi.json")]),
    ("GET", "/docs"): (PUBLIC, [Call("/docs")]),
    ("GET", "/docs/init.js"): (PUBLIC, [Call("/docs/init.js")]),
    ("GET", "/docs/swagger-ui.css"): (PUBLIC, [Call("/docs/swagger-ui.css")]),
    ("GET", "/docs/swagger-ui-bundle.js"): (PUBLIC, [Call("/docs/swagger-ui-bundle.js")]),
    ("GET", "/docs/swagger-ui-standalone-preset.js"): (PUBLIC, [Call("/docs/swagger-ui-standalone-preset.js")]),
    ("GET", "/docs/favicon-32x32.png"): (PUBLIC, [Call("/docs/favicon-32x32.png")]),
    # security: self-service
    ("POST", "/v1/auth/login"): (PUBLIC, [Call("/v1/auth/login", {})]),
    ("POST", "/v1/auth/logout"): (SELF, [Call("/v1/auth/logout", fresh_token=True)]),
    ("GET", "/v1/auth/me"): (SELF, [Call("/v1/auth/me")]),
    ("POST", "/v1/auth/password"): (SELF, [Call("/v1/auth/password", {})]),
    ("POST", "/v1/auth/totp/enroll"): (SELF, [Call("/v1/auth/totp/enroll")]),
    ("POST", "/v1/auth/totp/confirm"): (SELF, [Call("/v1/auth/totp/confirm", {"code": "x"})]),
    # security: administration (三权分立)
    ("GET", "/v1/security/users"): (SYS_SEC, [Call("/v1/security/users")]),
    ("POST", "/v1/security/users"): (SYS, [Call("/v1/security/users", {})]),
    ("DELETE", "/v1/security/users/{name}"): (SYS, [Call("/v1/security/users/ghost")]),
    ("PUT", "/v1/security/users/{name}/roles"): (SEC, [Call("/v1/security/users/ghost/roles", {"roles": []})]),
    **{("POST", f"/v1/security/users/{{name}}/{action}"): (SYS, [Call(f"/v1/security/users/ghost/{action}")])
       for action in ("disable", "enable", "reset-password", "reset-totp")},
    ("GET", "/v1/security/roles"): (SEC, [Call("/v1/security/roles")]),
    ("POST", "/v1/security/roles"): (SEC, [Call("/v1/security/roles", {})]),
    ("DELETE", "/v1/security/roles/{name}"): (SEC, [Call("/v1/security/roles/ghost")]),
    ("GET", "/v1/security/keys"): (SYS, [Call("/v1/security/keys")]),
    ("POST", "/v1/security/keys"): (SYS, [Call("/v1/security/keys", {})]),
    ("DELETE", "/v1/security/keys/{id}"): (SYS, [Call("/v1/security/keys/ghost")]),
    # security policy enforcement: the secadmin's (security.policy)
    ("GET", "/v1/security/lockouts"): (SEC, [Call("/v1/security/lockouts")]),
    ("DELETE", "/v1/security/lockouts/{name}"): (SEC, [Call("/v1/security/lockouts/ghost")]),
    ("GET", "/v1/security/secrets"): (SEC, [Call("/v1/security/secrets")]),
    ("GET", "/v1/security/sessions"): (SEC, [Call("/v1/security/sessions")]),
    ("DELETE", "/v1/security/sessions/{id}"): (SEC, [Call("/v1/security/sessions/ghost")]),
    ("GET", "/v1/safety/policies"): (SEC, [Call("/v1/safety/policies")]),
    # self-service API keys: anyone signed in, for its own keys (docs/security.md)
    ("GET", "/v1/security/me/keys"): (SELF, [Call("/v1/security/me/keys")]),
    ("POST", "/v1/security/me/keys"): (SELF, [Call("/v1/security/me/keys", {})]),
    ("DELETE", "/v1/security/me/keys/{id}"): (SELF, [Call("/v1/security/me/keys/ghost")]),
    # groups (security.group: sysadmin, who manages users and keys) and usage (docs/usage.md)
    ("PUT", "/v1/security/keys/{id}/group"): (SYS, [Call("/v1/security/keys/ghost/group", {"group": None})]),
    ("GET", "/v1/security/groups"): (SYS, [Call("/v1/security/groups")]),
    ("POST", "/v1/security/groups"): (SYS, [Call("/v1/security/groups", {})]),
    ("DELETE", "/v1/security/groups/{name}"): (SYS, [Call("/v1/security/groups/ghost")]),
    ("PUT", "/v1/security/users/{name}/group"): (SYS, [Call("/v1/security/users/ghost/group", {"group": None})]),
    ("GET", "/v1/usage"): (SELF, [Call("/v1/usage")]),
    ("GET", "/v1/quotas"): (SELF, [Call("/v1/quotas")]),
    ("POST", "/v1/quotas"): (SYS, [Call("/v1/quotas", {})]),
    ("DELETE", "/v1/quotas/{qid}"): (SYS, [Call("/v1/quotas/ghost")]),
    # audit log: the auditor only
    ("GET", "/v1/audit/chains"): (AUD, [Call("/v1/audit/chains")]),
    ("GET", "/v1/audit/records"): (AUD, [Call("/v1/audit/records?limit=1")]),
    ("POST", "/v1/audit/verify"): (AUD, [Call("/v1/audit/verify")]),
    # gateway
    ("POST", "/v1/chat/completions"): (SYS, [Call("/v1/chat/completions", {})]),
    ("POST", "/v1/completions"): (SYS, [Call("/v1/completions", {})]),
    ("POST", "/v1/embeddings"): (SYS, [Call("/v1/embeddings", {})]),
    ("POST", "/v1/rerank"): (SYS, [Call("/v1/rerank", {})]),
    ("POST", "/rerank"): (SYS, [Call("/rerank", {})]),
    ("GET", "/v1/models"): (SYS, [Call("/v1/models")]),
    ("POST", "/v1/jobs"): (SYS, [Call("/v1/jobs", {})]),
    ("GET", "/v1/jobs"): (SYS, [Call("/v1/jobs")]),
    ("GET", "/v1/jobs/{job_id}"): (SYS, [Call("/v1/jobs/ghost")]),
    ("DELETE", "/v1/jobs/{job_id}"): (SYS, [Call("/v1/jobs/ghost")]),
    # db bridge
    ("GET", "/v1/db"): (SYS, [Call("/v1/db")]),
    ("POST", "/v1/db/{database}/{query}"): (SYS, [Call("/v1/db/main/hello", {}), Call("/v1/db/main/ghost", {})]),
    ("GET", "/v1/db/{database}/{query}"): (SYS, [Call("/v1/db/main/hello")]),
    # inference (KServe v2)
    ("GET", "/v2"): (SYS, [Call("/v2")]),
    # KServe health probes: in the default `[security] public_paths` (docs/configuration.md)
    ("GET", "/v2/health/live"): (PUBLIC, [Call("/v2/health/live")]),
    ("GET", "/v2/health/ready"): (PUBLIC, [Call("/v2/health/ready")]),
    ("POST", "/v2/models/{name}/infer"): (SYS, [Call("/v2/models/ghost/infer", {})]),
    ("GET", "/v2/models/{name}"): (SYS, [Call("/v2/models/ghost")]),
    ("GET", "/v2/models/{name}/ready"): (SYS, [Call("/v2/models/ghost/ready")]),
    ("GET", "/v2/models/{name}/config"): (SYS, [Call("/v2/models/ghost/config")]),
    ("GET", "/v2/models/{name}/versions/{version}"): (SYS, [Call("/v2/models/ghost/versions/1")]),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): (SYS, [Call("/v2/models/ghost/versions/1/ready")]),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): (SYS, [Call("/v2/models/ghost/versions/1/infer", {})]),
    ("GET", "/v2/repository/index"): (SYS, [Call("/v2/repository/index")]),
    ("POST", "/v2/repository/index"): (SYS, [Call("/v2/repository/index", {})]),
    # vectors
    ("POST", "/v1/vectors/collections"): (SYS, [Call("/v1/vectors/collections", {})]),
    ("GET", "/v1/vectors/collections"): (SYS, [Call("/v1/vectors/collections")]),
    ("GET", "/v1/vectors/collections/{name}"): (SYS, [Call("/v1/vectors/collections/ghost")]),
    ("DELETE", "/v1/vectors/collections/{name}"): (SYS, [Call("/v1/vectors/collections/ghost")]),
    ("POST", "/v1/vectors/collections/{name}/index"): (SYS, [Call("/v1/vectors/collections/ghost/index", {})]),
    ("POST", "/v1/vectors/{collection}/upsert"): (SYS, [Call("/v1/vectors/ghost/upsert", {})]),
    ("POST", "/v1/vectors/{collection}/search"): (SYS, [Call("/v1/vectors/ghost/search", {})]),
    ("POST", "/v1/vectors/{collection}/delete"): (SYS, [Call("/v1/vectors/ghost/delete", {})]),
    ("GET", "/v1/vectors/{collection}/export"): (SYS, [Call("/v1/vectors/ghost/export")]),
    # crypto
    ("POST", "/v1/crypto/sign"): (SYS, [Call("/v1/crypto/sign", {})]),
    ("POST", "/v1/crypto/verify"): (SYS, [Call("/v1/crypto/verify", {})]),
    ("POST", "/v1/crypto/encrypt"): (SYS, [Call("/v1/crypto/encrypt", {})]),
    ("POST", "/v1/crypto/decrypt"): (SYS, [Call("/v1/crypto/decrypt", {})]),
    ("POST", "/v1/crypto/hash"): (SYS_CUSTOM, [Call("/v1/crypto/hash", {"text": "abc"})]),
    ("POST", "/v1/crypto/hmac"): (SYS, [Call("/v1/crypto/hmac", {})]),
    ("POST", "/v1/crypto/random"): (SYS, [Call("/v1/crypto/random", {"n": 8})]),
    ("GET", "/v1/crypto/keys"): (SYS, [Call("/v1/crypto/keys")]),
    ("GET", "/v1/crypto/keys/{name}"): (SYS, [Call("/v1/crypto/keys/ghost")]),
    ("POST", "/v1/crypto/keys/{name}/rotate"): (SYS, [Call("/v1/crypto/keys/ghost/rotate")]),
    # the web console (docs/console.md): each page needs the permission of the API calls it makes
    ("GET", "/console/"): (SELF, [Call("/console/")]),
    ("GET", "/console/login"): (PUBLIC, [Call("/console/login")]),
    ("POST", "/console/login"): (PUBLIC, [Call("/console/login", {})]),
    ("POST", "/console/logout"): (SELF, [Call("/console/logout", fresh_token=True)]),
    ("GET", "/console/password"): (SELF, [Call("/console/password")]),
    ("POST", "/console/password"): (SELF, [Call("/console/password", {})]),
    ("GET", "/console/totp"): (SELF, [Call("/console/totp")]),
    ("POST", "/console/totp"): (SELF, [Call("/console/totp", {})]),
    ("GET", "/console/usage"): (SELF, [Call("/console/usage")]),
    ("GET", "/console/users"): (SYS_SEC, [Call("/console/users")]),
    ("POST", "/console/users"): (SYS, [Call("/console/users", {})]),
    ("POST", "/console/users/{name}/roles"): (SEC, [Call("/console/users/ghost/roles", {})]),
    ("POST", "/console/users/{name}/{action}"): (SYS, [Call("/console/users/ghost/disable", {})]),
    ("GET", "/console/roles"): (SEC, [Call("/console/roles")]),
    ("GET", "/console/keys"): (SYS, [Call("/console/keys")]),
    ("POST", "/console/keys"): (SYS, [Call("/console/keys", {})]),
    ("POST", "/console/keys/{id}/revoke"): (SYS, [Call("/console/keys/ghost/revoke", {})]),
    ("GET", "/console/groups"): (SYS, [Call("/console/groups")]),
    ("POST", "/console/groups"): (SYS, [Call("/console/groups", {})]),
    ("GET", "/console/audit"): (AUD, [Call("/console/audit")]),
    ("POST", "/console/audit/verify"): (AUD, [Call("/console/audit/verify", {})]),
    ("GET", "/console/audit/chains"): (AUD, [Call("/console/audit/chains")]),
    ("GET", "/console/audit/export"): (AUD, [Call("/console/audit/export?format=csv")]),
    ("GET", "/console/overview"): (SYS, [Call("/console/overview")]),
    ("GET", "/console/overview/data"): (SYS, [Call("/console/overview/data")]),
    ("GET", "/console/models"): (SYS, [Call("/console/models")]),
    ("GET", "/console/vectors"): (SYS, [Call("/console/vectors"), Call("/console/vectors?name=ghost")]),
    ("POST", "/console/vectors/{name}/search"): (SYS, [Call("/console/vectors/ghost/search", {})]),
    ("GET", "/console/db"): (SYS, [Call("/console/db")]),
    ("GET", "/console/db/{database}/{query}"): (SYS, [Call("/console/db/main/hello")]),
    ("POST", "/console/db/{database}/{query}"): (SYS, [Call("/console/db/main/hello", {})]),
    ("GET", "/console/jobs"): (SYS, [Call("/console/jobs")]),
    ("POST", "/console/jobs/{id}/cancel"): (SYS, [Call("/console/jobs/ghost/cancel", {})]),
    ("GET", "/console/crypto"): (SYS, [Call("/console/crypto"), Call("/console/crypto?name=ghost")]),
    ("POST", "/console/crypto/{name}/rotate"): (SYS, [Call("/console/crypto/ghost/rotate", {})]),
    ("GET", "/console/playground"): (SYS, [Call("/console/playground")]),
    ("POST", "/console/playground"): (SYS, [Call("/console/playground", {})]),
    ("GET", "/console/security"): (SEC, [Call("/console/security")]),
    ("POST", "/console/security/unlock/{name}"): (SEC, [Call("/console/security/unlock/ghost", {})]),
    ("POST", "/console/security/sessions/{id}/end"): (SEC, [Call("/console/security/sessions/ghost/end", {})]),
    ("GET", "/console/safety"): (SEC, [Call("/console/safety")]),
    ("GET", "/console/me/keys"): (SELF, [Call("/console/me/keys")]),
    ("POST", "/console/me/keys"): (SELF, [Call("/console/me/keys", {})]),
    ("POST", "/console/me/keys/{id}/revoke"): (SELF, [Call("/console/me/keys/ghost/revoke", {})]),
    ("GET", "/console/static/{name}"): (PUBLIC, [Call("/console/static/console.js")]),
}

# every capability of the default list must be in the app: one silently disabled would hide its routes
CAPABILITIES = {"security", "crypto", "gateway", "db", "inference", "vector", "usage", "console", "safety"}


def _settings(data_dir: Path) -> Any:
    return load_settings(
        None, data_dir=data_dir,
        security={"pbkdf2_iterations": 100_000},
        crypto={"access": "direct"},
        # an upstream that is never reached (nothing listens on the discard port): requests in the
        # matrix are refused before routing, this only makes the model known
        gateway={"upstreams": [{"name": "never", "base_url": "http://127.0.0.1:9/v1", "models": ["mock-model"]}]},
        inference={"mode": "inline"},
        vector={"backend": "milvus", "milvus": {"lite_mode": "in_process"}},
        db={"databases": {"main": {
            "driver": "sqlite", "dsn": str(data_dir / "rbac.sqlite"), "pool_size": 1,
            "queries": {"hello": {"sql": "SELECT 'hi' AS greeting"}},
        }}},
    )


def _cap(app: Any) -> SecurityCapability:
    return next(c for c in app.state.xc.capabilities if isinstance(c, SecurityCapability))


def _login(c: TestClient, who: str) -> str:
    r = c.post("/v1/auth/login", json={"username": who, "password": PW})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


@pytest.fixture
def full_app(data_dir: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from tests.inference.conftest import make_scale_model

    make_scale_model(data_dir / "models")  # inference without a model is not ready (a 503 probe)
    app = create_app(_settings(data_dir))  # the default capability list, as `xcstack serve` has it
    with TestClient(app, raise_server_exceptions=False) as c:
        svc = _cap(app).service

        async def setup() -> None:
            await svc.create_role(SYSTEM, CUSTOM_ROLE[0], CUSTOM_ROLE[1])
            for name, roles in USERS.items():
                await svc.create_user(SYSTEM, name, roles, kind="service", password=PW)

        assert c.portal is not None
        c.portal.call(setup)
        yield c, {who: _login(c, who) for who in AUTHENTICATED}


def app_routes(routes: list[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves, through Mounts; an opaque mounted
    app (no routes of its own) is listed with method '*'."""
    out: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount):
            inner = list(route.routes)
            if inner:
                out |= app_routes(inner, prefix + route.path)
            else:
                out.add(("*", prefix + route.path + "/{path:path}"))
        elif isinstance(route, Route):
            out |= {(m, prefix + route.path) for m in route.methods or {"GET"} if m != "HEAD"}
        else:  # a websocket route or anything else: must be in the matrix as well
            out.add(("*", prefix + str(getattr(route, "path", route))))
    return out


def routed_template(routes: list[BaseRoute], method: str, path: str, root_path: str = "") -> str | None:
    """The template of the route Starlette picks for (method, path): the matrix's concrete calls
    must really exercise the row they are listed under."""
    scope = {"type": "http", "method": method, "path": path.split("?")[0], "root_path": root_path}
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL and isinstance(route, Route):
            return route.path
        if match == Match.FULL and isinstance(route, Mount) and route.routes:  # the console's pages
            # Starlette keeps the full path in a mount's child scope and moves the prefix to root_path
            inner = routed_template(list(route.routes), method, path, child.get("root_path", root_path))
            if inner is not None:
                return route.path + inner
    return None


def test_every_app_route_has_a_row_and_every_row_a_route(full_app: tuple[TestClient, dict[str, str]]) -> None:
    c, _ = full_app
    xc = c.app.state.xc  # type: ignore[attr-defined]
    assert {cap.name for cap in xc.capabilities} == CAPABILITIES
    served = app_routes(c.app.routes)  # type: ignore[attr-defined]
    missing = sorted(served - MATRIX.keys())
    assert not missing, f"routes with no RBAC expectation in MATRIX (add a row: who may call them?): {missing}"
    stale = sorted(MATRIX.keys() - served)
    assert not stale, f"MATRIX rows for routes the app does not have: {stale}"
    for (method, template), (_, calls) in MATRIX.items():
        for call in calls:
            got = routed_template(c.app.routes, method, call.path)  # type: ignore[attr-defined]
            assert got == template, (method, call.path, got, template)


def test_rbac_matrix_every_route_and_principal(full_app: tuple[TestClient, dict[str, str]]) -> None:
    c, tokens = full_app
    expected_denials: dict[str, tuple[str, str, str]] = {}
    allowed_ids: dict[str, tuple[str, str, str]] = {}
    failures: list[str] = []
    n = 0
    for (method, _), (who_may, calls) in MATRIX.items():
        for call in calls:
            for who in PRINCIPALS:
                n += 1
                rid = f"rbac-{n}"
                headers = {"X-Request-Id": rid}
                if who != ANON:
                    token = _login(c, who) if call.fresh_token else tokens[who]
                    headers["Authorization"] = f"Bearer {token}"
                r = c.request(method, call.path, json=call.body, headers=headers)
                where = f"{method} {call.path} as {who}: {r.status_code} {r.text[:200]}"
                if who in who_may:
                    allowed_ids[rid] = (method, call.path, who)
                    if r.status_code in (401, 403) or r.status_code >= 500:
                        failures.append(f"expected allowed: {where}")
                else:
                    expected_denials[rid] = (method, call.path, who)
                    want, code = (401, "unauthorized") if who == ANON else (403, "forbidden")
                    if r.status_code != want or r.json().get("error", {}).get("code") != code:
                        failures.append(f"expected {want} {code}: {where}")
    assert not failures, "\n".join(failures)

    # every denial left its own audit record; no allowed call left one
    by_rid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in audit_records(_cap(c.app).audit_root):
        if isinstance(record.get("client_request_id"), str):  # the X-Request-Id sent, kept beside the server's id
            by_rid[record["client_request_id"]].append(record)  # type: ignore[index]
    unaudited = []
    for rid, (method, path, who) in expected_denials.items():
        action = "auth.denied" if who == ANON else "access.denied"
        recs = [x for x in by_rid[rid] if x["action"] == action and x["outcome"] == "denied"]
        if not recs:
            unaudited.append(f"{method} {path} as {who}")
            continue
        assert recs[0]["actor"] == ("anonymous" if who == ANON else who), recs[0]
        assert recs[0].get("ip"), recs[0]
    assert not unaudited, "denials without an audit record:\n" + "\n".join(unaudited)
    for rid, (method, path, who) in allowed_ids.items():
        denials = [x for x in by_rid[rid] if x["action"] in ("auth.denied", "access.denied")]
        assert not denials, (method, path, who, denials)
    assert n == len(PRINCIPALS) * sum(len(calls) for _, calls in MATRIX.values())


def _denial_records(c: TestClient, rid: str) -> list[dict[str, Any]]:
    return [x for x in audit_records(_cap(c.app).audit_root)
            if x.get("client_request_id") == rid and x["action"] == "access.denied" and x["outcome"] == "denied"]


def test_fine_grained_denials_are_403_and_audited(full_app: tuple[TestClient, dict[str, str]]) -> None:
    """A role with the coarse route permissions but not the resource (named query, key, collection,
    model): the capability's `authorize(...)` denies, and that denial is audited too."""
    c, tokens = full_app
    sec = {"Authorization": f"Bearer {tokens[SECADMIN]}"}
    coarse = [["db", "query"], ["crypto", "sign"], ["vector", "read"], ["route:/v1/chat/completions", "post"]]
    assert c.post("/v1/security/roles", headers=sec, json={"name": "coarse", "allow": coarse}).status_code == 201
    r = c.put(f"/v1/security/users/{NOROLES}/roles", headers=sec, json={"roles": ["coarse"]})
    assert r.status_code == 200, r.text
    assert c.portal is not None
    crypto: Any = c.app.state.xc.services.crypto  # type: ignore[attr-defined]
    c.portal.call(crypto.create_key, "app-sig", "sm2")
    h = {"Authorization": f"Bearer {tokens[NOROLES]}"}
    msg = [{"role": "user", "content": "hi"}]
    for i, (path, body, resource) in enumerate([
        ("/v1/db/main/hello", {}, "query:main/hello"),
        ("/v1/crypto/sign", {"key": "app-sig", "text": "x"}, "key:app-sig"),
        ("/v1/vectors/docs/search", {"vector": [1.0, 2.0, 3.0, 4.0]}, "collection:docs"),
        ("/v1/chat/completions", {"model": "mock-model", "messages": msg}, "model:mock-model"),
    ]):
        rid = f"fine-{i}"
        r = c.post(path, headers={**h, "X-Request-Id": rid}, json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)
        recs = _denial_records(c, rid)
        assert [x["resource"] for x in recs] == [resource], (path, recs)
        assert recs[0]["actor"] == NOROLES and recs[0]["detail"]["roles"] == ["coarse"]


def test_security_keys_are_not_usable_through_the_api(full_app: tuple[TestClient, dict[str, str]]) -> None:
    """The audit signing key and the secret box key belong to the security capability. sysadmin may
    use "every capability's resources", and secadmin may grant a custom role `key:*`, yet neither
    may sign, encrypt, decrypt or MAC with these keys: a signature over a forged audit checkpoint
    (or trusted-boot manifest) would verify. Their public side (read, verify) stays open."""
    c, tokens = full_app
    cap = _cap(c.app)
    signing_key = cap.settings.signing_key
    sec = {"Authorization": f"Bearer {tokens[SECADMIN]}"}
    everything = [["crypto", "*"], ["key:*", "*"]]
    assert c.post("/v1/security/roles", headers=sec, json={"name": "key-user", "allow": everything}).status_code == 201
    r = c.put(f"/v1/security/users/{NOROLES}/roles", headers=sec, json={"roles": ["key-user"]})
    assert r.status_code == 200, r.text
    assert c.portal is not None
    crypto = c.app.state.xc.services.crypto  # type: ignore[attr-defined]
    c.portal.call(crypto.create_key, "app-sig", "sm2")
    forged = rec.checkpoint_message(cap.audit.chain, 10**6, "ab" * 32, "2030-01-01T00:00:00.000000Z")
    data = base64.b64encode(forged).decode()
    real_sig = base64.b64encode(c.portal.call(crypto.sign, signing_key, forged)).decode()
    n = 0
    for who in (SYSADMIN, NOROLES):
        h = {"Authorization": f"Bearer {tokens[who]}"}
        for path, body, resource in [
            ("/v1/crypto/sign", {"key": signing_key, "data": data}, f"key:{signing_key}"),
            ("/v1/crypto/encrypt", {"key": signing_key, "text": "x"}, f"key:{signing_key}"),
            ("/v1/crypto/decrypt", {"key": signing_key, "ciphertext": "AAAA"}, f"key:{signing_key}"),
            ("/v1/crypto/encrypt", {"key": SECRETBOX_KEY, "text": "x"}, f"key:{SECRETBOX_KEY}"),
            ("/v1/crypto/decrypt", {"key": SECRETBOX_KEY, "ciphertext": "AAAA"}, f"key:{SECRETBOX_KEY}"),
            ("/v1/crypto/hmac", {"key": SECRETBOX_KEY, "text": "x"}, f"key:{SECRETBOX_KEY}"),
        ]:
            n += 1
            rid = f"reserved-{n}"
            r = c.post(path, headers={**h, "X-Request-Id": rid}, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (who, path, r.text)
            assert [x["resource"] for x in _denial_records(c, rid)] == [resource], (who, path)
        # other keys, and the public side of the reserved ones, stay usable
        assert c.post("/v1/crypto/sign", headers=h, json={"key": "app-sig", "data": data}).status_code == 200
        assert c.get(f"/v1/crypto/keys/{signing_key}", headers=h).status_code == 200
        r = c.post("/v1/crypto/verify", headers=h, json={"key": signing_key, "data": data, "signature": real_sig})
        assert r.status_code == 200 and r.json()["valid"] is True, r.text


def test_secadmin_cannot_change_its_own_or_other_administrators_roles(
    full_app: tuple[TestClient, dict[str, str]],
) -> None:
    c, tokens = full_app
    sec = {"Authorization": f"Bearer {tokens[SECADMIN]}"}
    for target, roles in [(SECADMIN, ["secadmin", "hasher"]), (SECADMIN, ["sysadmin"]), (AUDITOR, []),
                          (SYSADMIN, ["auditor"])]:
        r = c.put(f"/v1/security/users/{target}/roles", headers=sec, json={"roles": roles})
        assert r.status_code == 403, (target, roles, r.status_code, r.text)
    # an ordinary account: role assignment is the secadmin's job
    r = c.put(f"/v1/security/users/{NOROLES}/roles", headers=sec, json={"roles": ["hasher"]})
    assert r.status_code == 200, r.text


def test_health_probes_give_details_only_to_a_valid_token(full_app: tuple[TestClient, dict[str, str]],
                                                          data_dir: Path) -> None:
    """/readyz and /v2/health/ready answer anyone (load balancers), but the details (data paths, the
    audit chain's position, backends) only to a caller with a valid token."""
    c, tokens = full_app
    for path in ("/readyz", "/v2/health/ready"):
        anon = c.get(path)
        assert anon.status_code in (200, 503) and str(data_dir) not in anon.text, (path, anon.text)
        assert "detail" not in anon.text, (path, anon.text)
        bad = c.get(path, headers={"Authorization": "Bearer not-a-token"})
        assert "detail" not in bad.text and bad.status_code == anon.status_code
        authed = c.get(path, headers={"Authorization": f"Bearer {tokens[AUDITOR]}"})
        assert authed.status_code == anon.status_code and "detail" in authed.text, (path, authed.text)
    checks = c.get("/readyz").json()["checks"]
    assert checks and all(set(v) == {"ready"} for v in checks.values()), checks
    # a token that cannot be checked (state store down) counts as none: the probe still answers
    svc = _cap(c.app).service  # type: ignore[arg-type]

    async def store_down(token: str) -> None:
        raise ConnectionError("state store down")

    real = svc.authenticate
    svc.authenticate = store_down  # type: ignore[method-assign]
    try:
        r = c.get("/readyz", headers={"Authorization": f"Bearer {tokens[AUDITOR]}"})
        assert r.status_code in (200, 503) and "detail" not in r.text, r.text
    finally:
        svc.authenticate = real  # type: ignore[method-assign]


def test_model_permission_comes_before_model_existence(full_app: tuple[TestClient, dict[str, str]]) -> None:
    """A caller with the inference routes but no right on a model gets 403 whether or not the model
    exists, so it cannot probe the repository (every name below is unknown to the test repository)."""
    c, _ = full_app
    svc = _cap(c.app).service  # type: ignore[arg-type]

    async def setup() -> None:
        await svc.create_role(SYSTEM, "kserve-any", [("inference", "*"), ("model:granted", "*")])
        await svc.create_user(SYSTEM, "m-kserve", ["kserve-any"], kind="service", password=PW)

    assert c.portal is not None
    c.portal.call(setup)
    h = {"Authorization": f"Bearer {_login(c, 'm-kserve')}"}
    for method, path in [("GET", "/v2/models/secret-model"), ("GET", "/v2/models/secret-model/ready"),
                         ("GET", "/v2/models/secret-model/config"), ("POST", "/v2/models/secret-model/infer")]:
        r = c.request(method, path, headers=h, json={"inputs": []} if method == "POST" else None)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    # with the right on the name, the same unknown model is an honest 404
    assert c.get("/v2/models/granted/ready", headers=h).status_code == 404
