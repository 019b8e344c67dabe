"""A NUL character in a name the security routes look up or store, with the state on PostgreSQL.

PostgreSQL refuses NUL in text ("text fields cannot contain NUL (0x00) bytes"), so such a name used
to reach the database and answer 500, from the public login too. No stored name can hold one: the
routes refuse it as invalid input (bodies) or answer not found (path parameters), as on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.security.service import SYSTEM

PW = "Nul-Check-Pass-2024!"


@pytest.fixture
def client(data_dir: Path, pg_database: str) -> Iterator[TestClient]:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:  # the database is shared by the session
        for table in ("sec_users", "sec_sessions", "sec_api_keys", "sec_roles", "sec_lockout", "sec_secrets"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute("CREATE TABLE IF NOT EXISTS xc_schema_version "
                     "(namespace TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        conn.execute("DELETE FROM xc_schema_version WHERE namespace = 'security'")
    settings = load_settings(None, data_dir=data_dir, state={"url": pg_database},
                             security={"pbkdf2_iterations": 100_000})
    app = create_app(settings, ["xcstack.security.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        svc = next(cap for cap in app.state.xc.capabilities if cap.name == "security").service

        async def setup() -> None:
            for name, roles in [("n-sys", ["sysadmin"]), ("n-sec", ["secadmin"])]:
                await svc.create_user(SYSTEM, name, roles, kind="service", password=PW)

        assert c.portal is not None
        c.portal.call(setup)
        yield c


def _token(c: TestClient, name: str) -> dict[str, str]:
    r = c.post("/v1/auth/login", json={"username": name, "password": PW})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _code(r: Any, status: int) -> str:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    return str(r.json()["error"]["code"])


def test_nul_in_login_and_bodies_is_invalid_input(client: TestClient) -> None:
    c = client
    assert _code(c.post("/v1/auth/login", json={"username": "n-sys\u0000", "password": PW}), 400) == (
        "invalid_parameter")
    assert _code(c.post("/v1/auth/login", json={"username": "\u0000", "password": "x"}), 400) == "invalid_parameter"
    r = c.post("/v1/security/roles", headers=_token(c, "n-sec"),
               json={"name": "n-role", "allow": [["model:x", "invoke"]], "description": "a\u0000b"})
    assert _code(r, 400) == "invalid_parameter"
    # the ordinary answers still work
    assert _code(c.post("/v1/auth/login", json={"username": "n-nobody", "password": "x"}), 401) == (
        "invalid_credentials")


def test_nul_in_path_names_is_not_found(client: TestClient) -> None:
    c = client
    sys_h, sec_h = _token(c, "n-sys"), _token(c, "n-sec")
    calls: list[tuple[str, str, dict[str, str], Any, str]] = [
        ("DELETE", "/v1/security/users/a%00b", sys_h, None, "user_not_found"),
        ("POST", "/v1/security/users/a%00b/disable", sys_h, None, "user_not_found"),
        ("POST", "/v1/security/users/a%00b/reset-password", sys_h, None, "user_not_found"),
        ("PUT", "/v1/security/users/a%00b/roles", sec_h, {"roles": []}, "user_not_found"),
        ("DELETE", "/v1/security/roles/a%00b", sec_h, None, "role_not_found"),
        ("DELETE", "/v1/security/keys/a%00b", sys_h, None, "apikey_not_found"),
    ]
    for method, path, h, body, code in calls:
        assert _code(c.request(method, path, headers=h, json=body), 404) == code
    assert _code(c.delete("/v1/security/users/ghost", headers=sys_h), 404) == "user_not_found"
