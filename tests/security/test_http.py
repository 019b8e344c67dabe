"""The security capability through the real app: authentication, the RBAC matrix, restricted
sessions, audit of every call and denial, fail-closed audit, secrets kept out of logs."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings, masked_dump
from xcstack.security.capability import SecurityCapability
from xcstack.security.guard import audit, authorize, requires, requires_route
from xcstack.security.service import SYSTEM

from .conftest import audit_records

PW = "Matrix-Pass-2024!"


# -- a demo capability standing in for the others (gateway, vector, db ...) -----------------------
@requires("model:demo", "invoke")
async def marked(request: Request) -> Response:
    return JSONResponse({"ok": True})


@requires_route  # the route's own permission: route:<template>, <method>
async def plain(request: Request) -> Response:
    return JSONResponse({"ok": True})


@requires_route
async def fine(request: Request) -> Response:
    await authorize(request, "collection:docs", "read")
    await audit(request, "collection.read", "collection:docs", "success", {"n": 1})
    return JSONResponse({"ok": True})


@requires_route
async def boom(request: Request) -> Response:
    raise RuntimeError("kaboom")


class KeyEndpoint(HTTPEndpoint):
    @requires("key:demo-key", "read")
    async def get(self, request: Request) -> Response:
        return JSONResponse({"ok": True})


@requires_route
async def raw_asgi(scope: Any, receive: Any, send: Any) -> None:  # an opaque mounted app
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"raw"})


class _Demo:
    name = "demo"

    def routes(self) -> list[Any]:
        return [Route("/v1/demo/marked", marked), Route("/v1/demo/plain", plain), Route("/v1/demo/fine", fine),
                Route("/v1/demo/boom", boom), Route("/v1/demo/ep", KeyEndpoint),
                Mount("/v1/demo/raw", app=raw_asgi)]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"


_mod = types.ModuleType("xc_test_security_demo")
_mod.create = lambda ctx: _Demo()  # type: ignore[attr-defined]
sys.modules["xc_test_security_demo"] = _mod
MODULES = ["xcstack.security.capability", "xc_test_security_demo"]


def _app(data_dir: Path, **security: Any) -> Any:
    settings = load_settings(None, data_dir=data_dir, security={"pbkdf2_iterations": 100_000, **security})
    return create_app(settings, MODULES)


def _cap(app: Any) -> SecurityCapability:
    return next(c for c in app.state.xc.capabilities if isinstance(c, SecurityCapability))


def _run(client: TestClient, coro: Any) -> Any:
    assert client.portal is not None
    return client.portal.call(lambda: coro)


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    app = _app(data_dir)
    with TestClient(app, raise_server_exceptions=False) as c:
        cap = _cap(app)
        svc = cap.service

        async def setup() -> None:
            await svc.create_role(SYSTEM, "llm-user", [("route:/v1/demo/*", "get"), ("model:demo", "invoke")])
            for name, roles in [("sys", ["sysadmin"]), ("sec", ["secadmin"]), ("aud", ["auditor"]),
                                ("llm", ["llm-user"]), ("nobody", [])]:
                await svc.create_user(SYSTEM, name, roles, kind="service", password=PW)

        _run(c, setup())
        c.tokens = {}  # type: ignore[attr-defined]
        for name in ("sys", "sec", "aud", "llm", "nobody"):
            r = c.post("/v1/auth/login", json={"username": name, "password": PW})
            assert r.status_code == 200, r.text
            c.tokens[name] = r.json()["token"]  # type: ignore[attr-defined]
        yield c


def H(c: TestClient, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {c.tokens[who]}"}  # type: ignore[attr-defined]


ROLES = ["sys", "sec", "aud", "llm", "nobody"]
# (method, path, json, {role: expected status}); roles not listed expect 403
MATRIX: list[tuple[str, str, Any, dict[str, int]]] = [
    ("GET", "/v1/auth/me", None, {r: 200 for r in ROLES}),
    ("GET", "/v1/security/users", None, {"sys": 200, "sec": 200}),
    ("POST", "/v1/security/users", {"name": "new1", "kind": "service"}, {"sys": 201}),
    ("POST", "/v1/security/users/llm/disable", None, {}),  # checked separately (it revokes tokens)
    ("PUT", "/v1/security/users/nobody/roles", {"roles": []}, {"sec": 200}),
    ("GET", "/v1/security/roles", None, {"sec": 200}),
    ("POST", "/v1/security/roles", {"name": "r-x", "allow": [["model:x", "invoke"]]}, {"sec": 201}),
    ("GET", "/v1/security/keys", None, {"sys": 200}),
    ("POST", "/v1/security/keys", {"name": "k1", "roles": ["llm-user"]}, {"sys": 201}),
    ("GET", "/v1/audit/chains", None, {"aud": 200}),
    ("GET", "/v1/audit/records?limit=5", None, {"aud": 200}),
    ("POST", "/v1/audit/verify", None, {"aud": 200}),
    ("GET", "/v1/demo/marked", None, {"sys": 200, "llm": 200}),
    ("GET", "/v1/demo/plain", None, {"sys": 200, "llm": 200}),
    ("GET", "/v1/demo/fine", None, {"sys": 200}),
    ("GET", "/v1/demo/ep", None, {"sys": 200}),  # HTTPEndpoint method mark: key:demo-key
    ("GET", "/v1/demo/raw/any/thing", None, {"sys": 200, "llm": 200}),  # opaque Mount: route permission
]


def test_rbac_matrix_every_route_and_role(client: TestClient) -> None:
    cap = _cap(client.app)
    denied = 0
    for method, path, body, expect in MATRIX:
        if path.endswith("/disable"):
            continue
        for role in ROLES:
            want = expect.get(role, 403)
            r = client.request(method, path, json=body, headers=H(client, role))
            assert r.status_code == want, (method, path, role, r.status_code, r.text)
            if want == 403:
                denied += 1
                err = r.json()["error"]
                assert err["code"] == "forbidden" and err["type"] == "permission_error"
            if method == "POST" and want in (200, 201) and body and "name" in body:
                body = {**body, "name": body["name"] + "x"}  # a second success would conflict
    # every denial is in the audit log
    _run(client, asyncio.sleep(0))
    recs = audit_records(cap.audit_root)
    denials = [x for x in recs if x["action"] == "access.denied"]
    assert len(denials) == denied
    assert all(x["outcome"] == "denied" and x.get("request_id") for x in denials)


def test_every_route_of_the_app_requires_authentication(client: TestClient) -> None:
    from starlette.routing import Route as R

    from xcstack import apiref

    for route in client.app.routes:  # type: ignore[attr-defined]
        if not isinstance(route, R):  # Mounts: covered by the matrix
            continue
        path = route.path.replace("{name}", "x").replace("{id}", "x")
        for method in route.methods or ["GET"]:
            if method == "HEAD":
                continue
            r = client.request(method, path)
            # public: the probes, the login, and the API contract with its reference page (GET only)
            if path in ("/healthz", "/readyz") or (method, path) == ("POST", "/v1/auth/login") or (
                    method == "GET" and path in apiref.PATHS):
                assert r.status_code != 401, path
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")


def test_unknown_route_still_needs_auth_and_bad_token(client: TestClient) -> None:
    assert client.get("/v1/nowhere").status_code == 401
    r = client.get("/v1/auth/me", headers={"Authorization": "Bearer xcs_forged"})
    assert r.status_code == 401
    r = client.get("/v1/nowhere", headers=H(client, "sys"))
    assert r.status_code == 404


def test_metrics_protection_is_configurable(data_dir: Path) -> None:
    with TestClient(_app(data_dir)) as c:
        assert c.get("/metrics").status_code == 401
    with TestClient(_app(data_dir, metrics_public=True)) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/healthz").status_code == 200


def test_api_call_record_written(client: TestClient) -> None:
    cap = _cap(client.app)
    r = client.get("/v1/demo/plain", headers={**H(client, "llm"), "X-Request-Id": "req-durable-1"})
    assert r.status_code == 200
    _run(client, cap.audit.flush())  # a data-plane record: durable within the window (test_audit_classes.py)
    recs = [x for x in audit_records(cap.audit_root) if x.get("client_request_id") == "req-durable-1"]
    assert recs and recs[-1]["action"] == "api.call" and recs[-1]["actor"] == "llm"
    assert recs[-1]["detail"] == {"method": "GET", "status": 200}
    assert recs[-1]["resource"] == "route:/v1/demo/plain" and recs[-1]["ip"]


def test_guard_audit_and_unhandled_error_are_recorded(client: TestClient) -> None:
    cap = _cap(client.app)
    assert client.get("/v1/demo/fine", headers={**H(client, "sys"), "X-Request-Id": "req-fine"}).status_code == 200
    r = client.get("/v1/demo/boom", headers={**H(client, "sys"), "X-Request-Id": "req-boom"})
    assert r.status_code == 500
    _run(client, cap.audit.flush())
    recs = audit_records(cap.audit_root)
    assert any(x["action"] == "collection.read" and x.get("client_request_id") == "req-fine" for x in recs)
    boom = [x for x in recs if x.get("client_request_id") == "req-boom"]
    assert boom and boom[-1]["outcome"] == "failure" and boom[-1]["detail"]["status"] == 500


def test_audit_failure_fails_closed(client: TestClient) -> None:
    cap = _cap(client.app)
    log = cap.audit
    log.settings.durability = "strict"  # every call waits for its record (by_class: test_audit_classes.py)
    assert log._fd is not None
    good = log._fd
    log._fd = os.open(os.devnull, os.O_RDONLY)  # the disk "fails": every write errors
    r = client.get("/v1/demo/plain", headers=H(client, "llm"))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "audit_unavailable"
    os.close(good)
    # the writer re-reads its chain head from disk and carries on; the chain still verifies
    assert client.get("/v1/demo/plain", headers=H(client, "llm")).status_code == 200
    aud = client.post("/v1/audit/verify", headers=H(client, "aud")).json()
    assert aud["ok"], aud


def test_disable_revokes_and_logout(client: TestClient) -> None:
    assert client.post("/v1/security/users/llm/disable", headers=H(client, "sys")).status_code == 200
    assert client.get("/v1/auth/me", headers=H(client, "llm")).status_code == 401
    assert client.post("/v1/auth/logout", headers=H(client, "nobody")).status_code == 200
    assert client.get("/v1/auth/me", headers=H(client, "nobody")).status_code == 401


def test_login_errors_are_json_with_stable_codes(client: TestClient) -> None:
    r = client.post("/v1/auth/login", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/auth/login", json={"username": "sys"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"
    a = client.post("/v1/auth/login", json={"username": "sys", "password": "Wrong-Pass-123"})
    b = client.post("/v1/auth/login", json={"username": "ghost", "password": "Wrong-Pass-123"})
    assert a.status_code == b.status_code == 401 and a.json() == b.json()
    for _ in range(4):
        client.post("/v1/auth/login", json={"username": "sys", "password": "Wrong-Pass-123"})
    r = client.post("/v1/auth/login", json={"username": "sys", "password": PW})
    assert r.status_code == 429 and r.json()["error"]["code"] == "account_locked" and "retry-after" in r.headers


def test_first_start_admin_must_change_password_then_enrol_totp(
    data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    app = _app(data_dir)
    with TestClient(app) as c:
        err = capfd.readouterr().err
        line = next(x for x in err.splitlines() if x.strip().startswith("admin "))
        one_time = line.split("password", 1)[1].strip()
        tok = c.post("/v1/auth/login", json={"username": "admin", "password": one_time}).json()["token"]
        h = {"Authorization": f"Bearer {tok}"}
        r = c.get("/v1/security/users", headers=h)
        assert r.status_code == 403 and r.json()["error"]["code"] == "password_change_required"
        change = {"old_password": one_time, "new_password": "Fresh-Root-Pass-71"}
        r = c.post("/v1/auth/password", headers=h, json=change)
        assert r.status_code == 200, r.text
        r = c.get("/v1/security/users", headers=h)
        assert r.status_code == 403 and r.json()["error"]["code"] == "totp_enrollment_required"
        enrol = c.post("/v1/auth/totp/enroll", headers=h).json()
        code = pyotp.TOTP(enrol["secret"]).now()
        r = c.post("/v1/auth/totp/confirm", headers=h, json={"code": code})
        assert r.status_code == 200 and len(r.json()["recovery_codes"]) == 10
        assert c.get("/v1/security/users", headers=h).status_code == 200
        # the one-time password was printed once, and is nowhere in the audit log
        cap = _cap(app)
        blob = b"".join(p.read_bytes() for p in cap.audit_root.rglob("seg-*.log"))
        assert one_time.encode() not in blob and enrol["secret"].encode() not in blob
    with TestClient(_app(data_dir)):
        assert "one-time" not in capfd.readouterr().err.lower()  # second start prints nothing


def test_secrets_never_in_logs_audit_or_config_dump(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(None, data_dir=data_dir,
                             security={"redis_url": "redis://:hunter2-redis-secret@127.0.0.1:6379/0"})
    dump = str(masked_dump(settings))
    assert "hunter2-redis-secret" not in dump
    caplog.set_level(logging.DEBUG)
    app = _app(data_dir)
    with TestClient(app) as c:
        cap = _cap(app)
        _run(c, cap.service.create_user(SYSTEM, "svc1", [], kind="service", password=PW))
        tok = c.post("/v1/auth/login", json={"username": "svc1", "password": PW}).json()["token"]
        c.post("/v1/auth/login", json={"username": "svc1", "password": PW + "x"})
        c.get("/v1/auth/me", headers={"Authorization": f"Bearer {tok}"})
        blob = b"".join(p.read_bytes() for p in cap.audit_root.rglob("*.log"))
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (PW, tok):
        assert secret not in logs
        assert secret.encode() not in blob
    assert tok.encode() not in (data_dir / "state.db").read_bytes()


def test_with_crypto_capability_signs_and_seals_through_the_crypto_client(data_dir: Path) -> None:
    from xcstack.security.secretbox import ServiceSecretBox
    from xcstack.security.signing import ServiceSigner

    settings = load_settings(None, data_dir=data_dir, crypto={"access": "direct"})
    app = create_app(settings, ["xcstack.crypto.capability", *MODULES])
    with TestClient(app, raise_server_exceptions=False) as c:
        cap = _cap(app)
        assert isinstance(cap.signer, ServiceSigner) and isinstance(cap.box, ServiceSecretBox)
        _run(c, cap.service.create_user(SYSTEM, "hum", [], kind="human", password=PW))
        _run(c, cap.service.create_user(SYSTEM, "aud2", ["auditor"], kind="service", password=PW))
        tok = c.post("/v1/auth/login", json={"username": "hum", "password": PW}).json()["token"]
        h = {"Authorization": f"Bearer {tok}"}
        enrol = c.post("/v1/auth/totp/enroll", headers=h).json()
        row = _run(c, cap.service.get_user("hum"))
        assert enrol["secret"] not in row["totp_secret"]
        assert c.post("/v1/auth/totp/confirm", headers=h, json={"code": pyotp.TOTP(enrol["secret"]).now()}).is_success
        _run(c, cap.audit.checkpoint())
        atok = c.post("/v1/auth/login", json={"username": "aud2", "password": PW}).json()["token"]
        r = c.post("/v1/audit/verify", headers={"Authorization": f"Bearer {atok}"})
        assert r.status_code == 200, r.text
        (chain,) = r.json()["chains"]
        assert r.json()["ok"] and chain["signatures_checked"] and chain["checkpoints"] >= 2
        # named secrets for other capabilities: sealed through the keystore's SM4 key
        secrets = app.state.xc.services.secrets
        _run(c, secrets.set("upstream-key", b"sk-live-123456"))
        assert _run(c, secrets.resolve("secret:upstream-key")) == "sk-live-123456"
        assert b"sk-live-123456" not in (data_dir / "state.db").read_bytes()


def test_sysadmin_cannot_take_over_other_administrators(client: TestClient) -> None:
    for action in ("reset-password", "reset-totp", "disable"):
        r = client.post(f"/v1/security/users/aud/{action}", headers=H(client, "sys"))
        assert r.status_code == 403, (action, r.text)
        r = client.post(f"/v1/security/users/sec/{action}", headers=H(client, "sys"))
        assert r.status_code == 403, (action, r.text)
    assert client.delete("/v1/security/users/aud", headers=H(client, "sys")).status_code == 403
    # ordinary accounts: fine
    r = client.post("/v1/security/users/nobody/reset-password", headers=H(client, "sys"))
    assert r.status_code == 200 and r.json()["one_time_password"]
    recs = audit_records(_cap(client.app).audit_root)
    assert any(x["action"] == "user.password_reset" and x["outcome"] == "denied" and x["resource"] == "user:aud"
               for x in recs)
    # the auditor still works
    assert client.get("/v1/audit/chains", headers=H(client, "aud")).status_code == 200


def test_server_exports_audit_records_to_http_collector(data_dir: Path) -> None:
    import json as _json
    import threading
    import time as _time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[dict[str, Any]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.extend(_json.loads(body)["records"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None: ...

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/ingest"
        app = _app(data_dir, audit={"export_http": url, "export_interval_s": 0.1})
        with TestClient(app) as c:
            c.post("/v1/auth/login", json={"username": "nobody-here", "password": "Wrong-Pass-123"})
            deadline = _time.time() + 10
            while _time.time() < deadline and not any(r["action"] == "auth.login" for r in got):
                _time.sleep(0.05)
        assert any(r["action"] == "auth.login" and r["outcome"] == "failure" for r in got)
        seqs = [r["seq"] for r in got]
        assert seqs == sorted(seqs) and seqs[0] == 1
    finally:
        srv.shutdown()


def test_audit_records_merged_across_chains_with_paging(data_dir: Path) -> None:
    from xcstack.security.audit.log import AuditLog
    from xcstack.security.settings import AuditSettings

    app = _app(data_dir)
    with TestClient(app) as c:
        cap = _cap(app)
        _run(c, cap.service.create_user(SYSTEM, "aud9", ["auditor"], kind="service", password=PW))
        other = AuditLog(cap.audit_root, AuditSettings(), chain="other-worker")  # a second worker's chain
        _run(c, other.open())
        for i in range(5):
            _run(c, other.append(actor="w2", action="api.call", resource=f"route:/x/{i}", outcome="success"))
        _run(c, other.close())
        tok = c.post("/v1/auth/login", json={"username": "aud9", "password": PW}).json()["token"]
        h = {"Authorization": f"Bearer {tok}"}
        seen: list[dict[str, Any]] = []
        after = None
        for _ in range(50):
            q = "limit=3" + (f"&after={after}" if after else "")
            page = c.get(f"/v1/audit/records?{q}", headers=h).json()
            seen += page["records"]
            after = page["next"]
            if after is None:
                break
        keys = [(r["ts"], r["chain"], r["seq"]) for r in seen]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert {r["chain"] for r in seen} == {cap.audit.chain, "other-worker"}
        only = c.get("/v1/audit/records?actor=w2&limit=100", headers=h).json()["records"]
        assert len(only) == 5 and all(r["actor"] == "w2" for r in only)
        one = c.get("/v1/audit/records?chain=other-worker&after_seq=2", headers=h).json()
        assert [r["seq"] for r in one["records"]] == [3, 4, 5, 6, 7]
        bad = c.get("/v1/audit/records?since=yesterday", headers=h)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameter"
        future = c.get("/v1/audit/records?since=2999-01-01", headers=h).json()
        assert future["records"] == []
