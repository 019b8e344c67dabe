"""Authentication and account hardening, through the real app over HTTP (issue 12, findings 3, 8, 9, 11):

- TOTP codes in non-ASCII digits are failed attempts (401/400, audited, counted toward the lockout), not 500s;
  so are missing and malformed second factors;
- a key created with an API key belongs to the key's owner (it authenticates), carries no right its creator
  lacks and does not outlive it;
- a password an administrator sets for another account must be changed at first login;
- the JSON bodies of the security API are strictly typed (`{"days": true}` is not one day).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.security.capability import SecurityCapability
from xcstack.security.service import SYSTEM, Principal

from .conftest import audit_records

PW = "Hardening-Pass-2024!"
FOREIGN_DIGITS = ["１２３４５６", "١٢٣٤٥٦", "¹²³⁴⁵⁶", "۱۲۳۴۵۶", "12345６"]  # all pass str.isdigit()


def _cap(app: Any) -> SecurityCapability:
    return next(c for c in app.state.xc.capabilities if isinstance(c, SecurityCapability))


def _run(client: TestClient, coro: Any) -> Any:
    assert client.portal is not None
    return client.portal.call(lambda: coro)


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(None, data_dir=data_dir, security={"pbkdf2_iterations": 100_000})
    app = create_app(settings, ["xcstack.security.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        c.cap = _cap(app)  # type: ignore[attr-defined]
        svc = c.cap.service  # type: ignore[attr-defined]

        async def setup() -> None:
            await svc.create_role(SYSTEM, "llm-user", [("model:demo", "invoke")])
            await svc.create_role(SYSTEM, "no-secret", [("model:public", "invoke")], [("model:secret", "*")])
            for name, roles, kind in [("sys", ["sysadmin"], "service"), ("sec", ["secadmin"], "service"),
                                      ("ops", ["sysadmin", "no-secret"], "service"), ("erin", [], "human")]:
                await svc.create_user(SYSTEM, name, roles, kind=kind, password=PW)

        _run(c, setup())
        yield c


def _login(c: TestClient, name: str, password: str = PW, **extra: Any) -> Any:
    return c.post("/v1/auth/login", json={"username": name, "password": password, **extra})


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _records(c: TestClient, action: str, resource: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(c.cap.audit_root)  # type: ignore[attr-defined]
            if r["action"] == action and r["resource"] == resource]


def _enrol_totp(c: TestClient) -> tuple[dict[str, str], str]:
    """erin (a human: TOTP required) logs in, enrols and confirms; returns her session and the secret."""
    r = _login(c, "erin")
    assert r.status_code == 200 and r.json()["restricted"] == "totp_enrollment", r.text
    h = _h(r.json()["token"])
    secret = c.post("/v1/auth/totp/enroll", headers=h).json()["secret"]
    r = c.post("/v1/auth/totp/confirm", headers=h, json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 200, r.text
    return h, secret


# -- finding 3: second factors ---------------------------------------------------------------------------
def test_login_with_non_ascii_totp_digits_is_a_counted_audited_failure(client: TestClient) -> None:
    _enrol_totp(client)
    for code in FOREIGN_DIGITS:  # 5 = the lockout threshold
        r = _login(client, "erin", totp=code)
        assert r.status_code == 401, (code, r.status_code, r.text)
        assert r.json()["error"]["code"] == "invalid_totp"
    fails = _records(client, "auth.login", "user:erin")
    assert [f["detail"]["reason"] for f in fails if f["outcome"] == "failure"] == ["malformed_totp"] * 5
    assert len(_records(client, "auth.lockout", "user:erin")) == 1
    # locked now: even the right password answers 429, and that denial is audited too
    r = _login(client, "erin", totp="123456")
    assert r.status_code == 429 and r.json()["error"]["code"] == "account_locked"
    assert _records(client, "auth.login", "user:erin")[-1]["outcome"] == "denied"


def test_missing_and_malformed_second_factors_count_toward_lockout(client: TestClient) -> None:
    _enrol_totp(client)
    for extra in [{}, {}, {"recovery_code": "ｘｘｘ"}, {"recovery_code": "zzzzzz-zzzzzz-zzzzzz"}, {"totp": "12 34"}]:
        assert _login(client, "erin", **extra).status_code == 401, extra
    reasons = [f["detail"]["reason"] for f in _records(client, "auth.login", "user:erin") if f["outcome"] == "failure"]
    assert reasons == ["totp_missing", "totp_missing", "malformed_recovery_code", "malformed_recovery_code",
                       "malformed_totp"]
    assert _login(client, "erin").status_code == 429


def test_totp_confirm_with_non_ascii_digits_is_400_audited_and_counted(client: TestClient) -> None:
    r = _login(client, "erin")
    h = _h(r.json()["token"])
    secret = client.post("/v1/auth/totp/enroll", headers=h).json()["secret"]
    for code in FOREIGN_DIGITS:
        r = client.post("/v1/auth/totp/confirm", headers=h, json={"code": code})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_totp", (code, r.text)
    fails = _records(client, "user.totp_confirm", "user:erin")
    assert [f["detail"]["reason"] for f in fails] == ["malformed_totp"] * 5
    assert len(_records(client, "auth.lockout", "user:erin")) == 1
    # the lock holds for the enrolment and for new logins alike
    r = client.post("/v1/auth/totp/confirm", headers=h, json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 429 and r.json()["error"]["code"] == "account_locked"
    assert _login(client, "erin").status_code == 429


def test_password_change_refused_while_the_account_is_locked(client: TestClient) -> None:
    h = _h(_login(client, "sys").json()["token"])
    for _ in range(5):
        r = client.post("/v1/auth/password", headers=h, json={"old_password": "Wrong-Pass-2024!",
                                                               "new_password": "Another-Pass-2024!"})
        assert r.status_code == 401
    r = client.post("/v1/auth/password", headers=h, json={"old_password": PW, "new_password": "Another-Pass-2024!"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "account_locked"
    assert _records(client, "user.password_change", "user:sys")[-1]["outcome"] == "denied"


# -- finding 8: keys created with keys ------------------------------------------------------------------------
def test_key_created_with_a_key_belongs_to_its_owner_and_works(client: TestClient) -> None:
    sys_h = _h(_login(client, "sys").json()["token"])
    k1 = client.post("/v1/security/keys", headers=sys_h, json={"name": "k1", "roles": ["sysadmin"], "days": 2})
    assert k1.status_code == 201, k1.text
    k2 = client.post("/v1/security/keys", headers=_h(k1.json()["key"]), json={"name": "k2", "roles": ["llm-user"]})
    assert k2.status_code == 201, k2.text
    me = client.get("/v1/auth/me", headers=_h(k2.json()["key"]))
    assert me.status_code == 200 and me.json()["kind"] == "api_key" and me.json()["roles"] == ["llm-user"]
    sys_id = _run(client, client.cap.service.get_user("sys"))["id"]  # type: ignore[attr-defined]
    keys = {k["name"]: k for k in client.get("/v1/security/keys", headers=sys_h).json()["keys"]}
    assert keys["k2"]["owner_id"] == keys["k1"]["owner_id"] == sys_id
    # a key does not outlive the key that created it (k2 asked for the 365-day default)
    assert k2.json()["expires_at"] <= k1.json()["expires_at"]


def test_key_never_carries_a_right_its_creator_is_denied(client: TestClient) -> None:
    svc = client.cap.service  # type: ignore[attr-defined]
    ops = _run(client, svc.get_user("ops"))
    ops_p = Principal(ops["id"], "ops", ("sysadmin", "no-secret"))
    assert not _run(client, svc.is_allowed(ops_p, "model:secret", "invoke"))
    h = _h(_login(client, "ops").json()["token"])
    # sysadmin alone would allow model:secret, which ops is denied
    r = client.post("/v1/security/keys", headers=h, json={"name": "escape", "roles": ["sysadmin"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert _records(client, "apikey.create", "apikey:escape")[-1]["outcome"] == "denied"
    # carrying the deny along is fine, and so is a role that stays inside ops' rights
    for roles in (["sysadmin", "no-secret"], ["llm-user"]):
        r = client.post("/v1/security/keys", headers=h, json={"name": "ok", "roles": roles})
        assert r.status_code == 201, (roles, r.text)
    # the same rule holds for keys created with such a key
    k = client.post("/v1/security/keys", headers=h, json={"name": "k", "roles": ["sysadmin", "no-secret"]})
    r = client.post("/v1/security/keys", headers=_h(k.json()["key"]), json={"name": "k-esc", "roles": ["sysadmin"]})
    assert r.status_code == 403


# -- finding 9: administrator-set passwords are one-time ------------------------------------------------------
def test_password_set_by_an_administrator_must_be_changed_at_first_login(client: TestClient) -> None:
    sys_h = _h(_login(client, "sys").json()["token"])
    r = client.post("/v1/security/users", headers=sys_h,
                    json={"name": "carol", "kind": "service", "password": "Chosen-By-Admin-77"})
    assert r.status_code == 201 and r.json()["user"]["must_change_password"] is True, r.text
    login = _login(client, "carol", "Chosen-By-Admin-77").json()
    assert login["restricted"] == "password_change"
    h = _h(login["token"])
    r = client.get("/v1/security/users", headers=h)
    assert r.status_code == 403 and r.json()["error"]["code"] == "password_change_required"
    r = client.post("/v1/auth/password", headers=h,
                    json={"old_password": "Chosen-By-Admin-77", "new_password": "Her-Own-Pass-88"})
    assert r.status_code == 200, r.text
    assert _login(client, "carol", "Her-Own-Pass-88").json()["restricted"] is None
    # and a reset password is one-time as well
    pw = client.post("/v1/security/users/carol/reset-password", headers=sys_h).json()["one_time_password"]
    assert _login(client, "carol", pw).json()["restricted"] == "password_change"


# -- finding 11: strict types ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "who", "body", "param"), [
    ("/v1/security/keys", "sys", {"name": "k", "roles": ["llm-user"], "days": True}, "days"),
    ("/v1/security/keys", "sys", {"name": "k", "roles": ["llm-user"], "days": "3"}, "days"),
    ("/v1/security/keys", "sys", {"name": "k", "roles": ["llm-user"], "days": 3.0}, "days"),
    ("/v1/security/users", "sys", {"name": "u1", "kind": "service", "password": 123456789012}, "password"),
    ("/v1/security/roles", "sec", {"name": "r1", "allow": [["model:x", 1]]}, "allow.0.1"),
    ("/v1/security/roles", "sec", {"name": "r1", "allow": [["model:x", "invoke"]], "description": False},
     "description"),
    ("/v1/auth/login", None, {"username": "sys", "password": PW, "totp": 123456}, "totp"),
])
def test_security_bodies_are_strictly_typed(client: TestClient, path: str, who: str | None, body: Any,
                                            param: str) -> None:
    h = _h(_login(client, who).json()["token"]) if who else {}
    r = client.post(path, headers=h, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_parameter" and err["param"] == param


def test_strict_bodies_still_accept_well_typed_input(client: TestClient) -> None:
    r = client.post("/v1/security/keys", headers=_h(_login(client, "sys").json()["token"]),
                    json={"name": "k", "roles": ["llm-user"], "days": 3})
    assert r.status_code == 201, r.text
    r = client.post("/v1/security/roles", headers=_h(_login(client, "sec").json()["token"]),
                    json={"name": "r1", "allow": [["model:x", "invoke"]], "deny": [["model:y", "*"]]})
    assert r.status_code == 201 and r.json()["allow"] == [["model:x", "invoke"]], r.text


def test_audit_query_digits_are_ascii_only(client: TestClient) -> None:
    svc = client.cap.service  # type: ignore[attr-defined]
    _run(client, svc.create_user(SYSTEM, "aud", ["auditor"], kind="service", password=PW))
    h = _h(_login(client, "aud").json()["token"])
    assert client.get("/v1/audit/records?since=2024-01-01", headers=h).status_code == 200
    for q in ("since=٢٠٢٤-٠١-٠١", "after=2024-01-01T00:00:00Z|c|١٢"):
        r = client.get(f"/v1/audit/records?{q}", headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter", (q, r.text)
