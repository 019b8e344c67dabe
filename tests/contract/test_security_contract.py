"""The security routes answer what their OpenAPI contract says: every /v1/auth, /v1/security and
/v1/audit operation is documented, and real answers of each (successes and errors) validate against
the response schema the document gives for their status, with the document's own components."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import pyotp
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.security.capability import SecurityCapability
from xcstack.security.service import SYSTEM

PW = "Contract-Pass-2024!"
NEW_PW = "Contract-Pass-2025?"
PREFIXES = ("/v1/auth/", "/v1/security/", "/v1/audit/")
DOC_URI = "urn:xcstack:openapi"


class _Request(Protocol):
    @property
    def method(self) -> str: ...


class _Response(Protocol):
    """What the test client answers (starlette's TestClient may use httpx or httpx2)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def request(self) -> _Request: ...

    def json(self) -> Any: ...


class Contract:
    """Validates a response against the schema the document gives for its operation and status."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(doc))
        self.checked: set[tuple[str, str]] = set()

    def schema(self, method: str, template: str, status: int) -> dict[str, Any]:
        responses = self.doc["paths"][template][method.lower()]["responses"]
        resp = responses.get(str(status), responses["default"])
        ref = resp.get("$ref")
        if ref:  # a shared error response
            resp = self.doc["components"]["responses"][ref.rsplit("/", 1)[1]]
        media = resp["content"]["application/json"]["schema"]
        assert media, f"{method} {template} {status}: no JSON schema documented"
        return media  # type: ignore[no-any-return]

    def check(self, r: _Response, template: str, status: int) -> Any:
        assert r.status_code == status, (template, r.status_code, r.text)
        schema = self.schema(r.request.method, template, status)
        self.validate(r.json(), schema)
        self.checked.add((r.request.method.lower(), template))
        return r.json()

    def validate(self, body: Any, schema: dict[str, Any]) -> None:
        # refs in the document are `#/components/...`: resolve them inside the document itself
        wrapped = {"$ref": DOC_URI + schema["$ref"]} if "$ref" in schema else schema
        validator = jsonschema.Draft202012Validator(wrapped, registry=self.registry)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def _cap(app: Any) -> SecurityCapability:
    return next(c for c in app.state.xc.capabilities if isinstance(c, SecurityCapability))


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(None, data_dir=data_dir, security={"pbkdf2_iterations": 100_000})
    app = create_app(settings, ["xcstack.security.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        svc = _cap(app).service

        async def setup() -> None:
            for name, roles in [("c-sys", ["sysadmin"]), ("c-sec", ["secadmin"]), ("c-aud", ["auditor"]),
                                ("c-self", []), ("c-owner", [])]:
                await svc.create_user(SYSTEM, name, roles, kind="service", password=PW)

        assert c.portal is not None
        c.portal.call(setup)
        yield c


@pytest.fixture
def contract(client: TestClient) -> Contract:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return Contract(r.json())


def _login(c: TestClient, k: Contract, name: str, password: str = PW, **extra: str) -> dict[str, str]:
    out = k.check(c.post("/v1/auth/login", json={"username": name, "password": password, **extra}),
                  "/v1/auth/login", 200)
    return {"Authorization": f"Bearer {out['token']}"}


def test_every_security_operation_is_documented(contract: Contract) -> None:
    ops = {(m, p): op for p, item in contract.doc["paths"].items() if p.startswith(PREFIXES) for m, op in item.items()}
    assert len(ops) == 36  # the user actions are four routes
    for (method, path), op in ops.items():
        assert not op.get("x-xc-undocumented"), (method, path)
        ok = next(s for s in op["responses"] if s.startswith("2"))
        assert "$ref" in op["responses"][ok]["content"]["application/json"]["schema"], (method, path)
    for a in ("disable", "enable", "reset-password", "reset-totp"):  # one route (and contract) per action
        assert contract.doc["paths"][f"/v1/security/users/{{name}}/{a}"]["post"]["x-xc-permission"] == (
            "security.user:write")
    for path in ("/v1/auth/logout", "/v1/auth/totp/enroll", "/v1/audit/verify"):
        assert "requestBody" not in contract.doc["paths"][path]["post"], path  # no body


def test_self_service_answers_match_the_contract(client: TestClient, contract: Contract) -> None:
    c, k = client, contract
    h = _login(c, k, "c-self")
    me = k.check(c.get("/v1/auth/me", headers=h), "/v1/auth/me", 200)
    assert me["name"] == "c-self" and me["restricted"] is None
    k.check(c.post("/v1/auth/password", headers=h, json={"old_password": "wrong", "new_password": NEW_PW}),
            "/v1/auth/password", 401)
    k.check(c.post("/v1/auth/password", headers=h, json={"old_password": PW, "new_password": NEW_PW}),
            "/v1/auth/password", 200)
    k.check(c.post("/v1/auth/totp/confirm", headers=h, json={"code": "123456"}), "/v1/auth/totp/confirm", 409)
    enrol = k.check(c.post("/v1/auth/totp/enroll", headers=h), "/v1/auth/totp/enroll", 200)
    k.check(c.post("/v1/auth/totp/confirm", headers=h, json={"code": "000000x"}), "/v1/auth/totp/confirm", 400)
    codes = k.check(c.post("/v1/auth/totp/confirm", headers=h, json={"code": pyotp.TOTP(enrol["secret"]).now()}),
                    "/v1/auth/totp/confirm", 200)
    assert codes["recovery_codes"]
    k.check(c.post("/v1/auth/totp/enroll", headers=h), "/v1/auth/totp/enroll", 409)
    # the second factor is now due: a login without it is refused, with a recovery code it passes
    k.check(c.post("/v1/auth/login", json={"username": "c-self", "password": NEW_PW}), "/v1/auth/login", 401)
    h2 = _login(c, k, "c-self", NEW_PW, recovery_code=codes["recovery_codes"][0])
    k.check(c.post("/v1/auth/logout", headers=h2), "/v1/auth/logout", 200)
    k.check(c.get("/v1/auth/me", headers=h2), "/v1/auth/me", 401)


def test_administration_answers_match_the_contract(client: TestClient, contract: Contract) -> None:
    c, k = client, contract
    sys_h, sec_h = _login(c, k, "c-sys"), _login(c, k, "c-sec")
    users = "/v1/security/users"
    created = k.check(c.post(users, headers=sys_h, json={"name": "c-new"}), users, 201)
    assert created["one_time_password"] and created["user"]["must_change_password"] is True
    h_new = _login(c, k, "c-new", created["one_time_password"])  # a restricted session
    assert k.check(c.get("/v1/auth/me", headers=h_new), "/v1/auth/me", 200)["restricted"] == "password_change"
    k.check(c.post(users, headers=sys_h, json={"name": "c-svc", "kind": "service", "password": PW}), users, 201)
    k.check(c.post(users, headers=sys_h, json={"name": "c-new"}), users, 409)
    k.check(c.post(users, headers=sys_h, json={"name": "c-x", "kind": True}), users, 400)
    listed = k.check(c.get(users, headers=sec_h), users, 200)
    assert {u["name"] for u in listed["users"]} >= {"c-new", "c-svc", "c-sys"}

    def act(action: str) -> str:
        return f"/v1/security/users/{{name}}/{action}"

    for action in ("disable", "enable", "reset-totp"):
        assert k.check(c.post(f"{users}/c-new/{action}", headers=sys_h), act(action), 200) == {"ok": True}
    assert k.check(c.post(f"{users}/c-new/reset-password", headers=sys_h), act("reset-password"), 200)[
        "one_time_password"]
    assert c.post(f"{users}/c-new/explode", headers=sys_h).status_code == 404  # no such route
    k.check(c.post(f"{users}/ghost/disable", headers=sys_h), act("disable"), 404)
    k.check(c.post(f"{users}/c-sec/reset-password", headers=sys_h), act("reset-password"), 403)  # an admin's account

    roles = "/v1/security/roles"
    role = k.check(c.post(roles, headers=sec_h, json={"name": "c-role", "allow": [["model:x", "invoke"]],
                                                      "deny": [["model:x", "admin"]]}), roles, 201)
    assert role["allow"] == [["model:x", "invoke"]] and role["builtin"] is False
    k.check(c.post(roles, headers=sec_h, json={"name": "c-role", "allow": [["model:x", "invoke"]]}), roles, 409)
    k.check(c.post(roles, headers=sec_h, json={"name": "c-bad", "allow": [["audit", "read"]]}), roles, 400)
    for perm in (["", "read"], ["model:" + "x" * 251, "invoke"]):  # bounded like every input (256 characters)
        err = k.check(c.post(roles, headers=sec_h, json={"name": "c-bad", "allow": [perm]}), roles, 400)
        assert err["error"]["code"] == "invalid_parameter"
    assert any(r["builtin"] for r in k.check(c.get(roles, headers=sec_h), roles, 200)["roles"])
    set_roles = "/v1/security/users/{name}/roles"
    k.check(c.put(f"{users}/c-svc/roles", headers=sec_h, json={"roles": ["c-role"]}), set_roles, 200)
    k.check(c.put(f"{users}/ghost/roles", headers=sec_h, json={"roles": []}), set_roles, 404)

    keys = "/v1/security/keys"
    key = k.check(c.post(keys, headers=sys_h, json={"name": "c-key", "roles": ["sysadmin"], "days": 2}), keys, 201)
    k.check(c.post(keys, headers=sys_h, json={"name": "c-key2", "roles": ["auditor"]}), keys, 403)
    listed_keys = k.check(c.get(keys, headers=sys_h), keys, 200)["keys"]
    assert [x["id"] for x in listed_keys] == [key["id"]] and listed_keys[0]["revoked"] is False
    k.check(c.delete(f"{keys}/{key['id']}", headers=sys_h), keys + "/{id}", 200)
    k.check(c.delete(f"{keys}/nope", headers=sys_h), keys + "/{id}", 404)

    k.check(c.delete(f"{roles}/c-role", headers=sec_h), roles + "/{name}", 200)
    k.check(c.delete(f"{roles}/sysadmin", headers=sec_h), roles + "/{name}", 400)
    k.check(c.delete(f"{users}/c-new", headers=sys_h), users + "/{name}", 200)
    k.check(c.delete(f"{users}/c-new", headers=sys_h), users + "/{name}", 404)
    k.check(c.get(users, headers=_login(c, k, "c-aud")), users, 403)


def test_audit_answers_match_the_contract(client: TestClient, contract: Contract) -> None:
    c, k = client, contract
    h = _login(c, k, "c-aud")
    chains = k.check(c.get("/v1/audit/chains", headers=h), "/v1/audit/chains", 200)["chains"]
    assert chains and chains[0]["segments"]
    rec = "/v1/audit/records"
    page = k.check(c.get(rec, headers=h, params={"limit": 2}), rec, 200)
    assert len(page["records"]) == 2 and isinstance(page["next"], str)
    page = k.check(c.get(rec, headers=h, params={"after": page["next"], "action": "auth.login"}), rec, 200)
    assert page["next"] is None and page["records"][0]["request_id"]
    one = k.check(c.get(rec, headers=h, params={"chain": chains[0]["chain"], "limit": 3}), rec, 200)
    assert one["next_after_seq"] == one["records"][-1]["seq"]
    k.check(c.get(rec, headers=h, params={"chain": "no-such-chain"}), rec, 404)
    k.check(c.get(rec, headers=h, params={"limit": "many"}), rec, 400)
    report = k.check(c.post("/v1/audit/verify", headers=h), "/v1/audit/verify", 200)
    assert report["ok"] and report["chains"][0]["records"] > 0 and report["chains"][0]["problem"] is None
    # a tampered record: the report names it (same length, so the live writer's offsets stay right)
    seg = Path(_cap(c.app).audit_root) / chains[0]["chain"] / chains[0]["segments"][0]
    data = seg.read_bytes()
    assert b'"outcome":"success"' in data
    seg.write_bytes(data.replace(b'"outcome":"success"', b'"outcome":"failure"', 1))
    report = k.check(c.post("/v1/audit/verify", headers=h), "/v1/audit/verify", 200)
    assert not report["ok"] and report["chains"][0]["problem"]["seq"] >= 1


def test_groups_policy_and_own_keys_answers_match_the_contract(client: TestClient, contract: Contract) -> None:
    c, k = client, contract
    sys_h, sec_h = _login(c, k, "c-sys"), _login(c, k, "c-sec")
    users, keys = "/v1/security/users", "/v1/security/keys"

    groups = "/v1/security/groups"
    k.check(c.post(groups, headers=sys_h, json={"name": "c-dept", "description": "研发"}), groups, 201)
    k.check(c.post(groups, headers=sys_h, json={"name": "c-dept"}), groups, 409)
    k.check(c.post(groups, headers=sys_h, json={"name": "c-dept2", "description": 7}), groups, 400)
    user_group, key_group = "/v1/security/users/{name}/group", "/v1/security/keys/{id}/group"
    k.check(c.put(f"{users}/c-self/group", headers=sys_h, json={"group": "c-dept"}), user_group, 200)
    k.check(c.put(f"{users}/ghost/group", headers=sys_h, json={"group": "c-dept"}), user_group, 404)
    k.check(c.put(f"{users}/c-self/group", headers=sys_h, json={"group": "no-such"}), user_group, 400)
    key = k.check(c.post(keys, headers=sys_h, json={"name": "c-gkey", "roles": ["sysadmin"], "days": 1}), keys, 201)
    k.check(c.put(f"{keys}/{key['id']}/group", headers=sys_h, json={"group": "c-dept"}), key_group, 200)
    k.check(c.put(f"{keys}/nope/group", headers=sys_h, json={"group": None}), key_group, 404)
    listed = k.check(c.get(groups, headers=sys_h), groups, 200)["groups"]
    assert [(g["name"], g["users"], g["keys"]) for g in listed] == [("c-dept", 1, 1)]
    k.check(c.delete(f"{groups}/c-dept", headers=sys_h), groups + "/{name}", 409)  # still has members
    k.check(c.put(f"{users}/c-self/group", headers=sys_h, json={"group": None}), user_group, 200)
    k.check(c.put(f"{keys}/{key['id']}/group", headers=sys_h, json={"group": None}), key_group, 200)
    k.check(c.delete(f"{groups}/c-dept", headers=sys_h), groups + "/{name}", 200)
    k.check(c.delete(f"{groups}/c-dept", headers=sys_h), groups + "/{name}", 404)
    k.check(c.get(groups, headers=sec_h), groups, 403)

    # lockouts: a service user locked by failed sign-ins is listed, then unlocked
    k.check(c.post(users, headers=sys_h, json={"name": "c-lock", "kind": "service", "password": PW}), users, 201)
    for _ in range(5):  # [security] lockout_threshold
        k.check(c.post("/v1/auth/login", json={"username": "c-lock", "password": "wrong"}), "/v1/auth/login", 401)
    k.check(c.post("/v1/auth/login", json={"username": "c-lock", "password": PW}), "/v1/auth/login", 429)
    lockouts = "/v1/security/lockouts"
    locked = k.check(c.get(lockouts, headers=sec_h), lockouts, 200)["locked"]
    assert [x["user"] for x in locked] == ["c-lock"] and locked[0]["locked_for_s"] > 0
    k.check(c.delete(f"{lockouts}/c-lock", headers=sec_h), lockouts + "/{name}", 200)
    k.check(c.delete(f"{lockouts}/ghost", headers=sec_h), lockouts + "/{name}", 404)
    assert k.check(c.get(lockouts, headers=sec_h), lockouts, 200) == {"locked": []}
    _login(c, k, "c-lock")
    k.check(c.get(lockouts, headers=sys_h), lockouts, 403)  # the secadmin's, not the sysadmin's

    # secret names (never values)
    async def put_secret() -> None:
        await _cap(c.app).secrets.set("c-secret", b"s3cr3t-value")

    assert c.portal is not None
    c.portal.call(put_secret)
    secrets = "/v1/security/secrets"
    r = c.get(secrets, headers=sec_h)
    assert [x["name"] for x in k.check(r, secrets, 200)["secrets"]] == ["c-secret"] and "s3cr3t" not in r.text
    k.check(c.get(secrets, headers=sys_h), secrets, 403)

    # sessions: listed without tokens, one ended
    aud_h = _login(c, k, "c-aud")
    sessions = "/v1/security/sessions"
    r = c.get(sessions, headers=sec_h)
    listed_s = k.check(r, sessions, 200)["sessions"]
    assert aud_h["Authorization"].split()[1] not in r.text
    aud = [x for x in listed_s if x["user"] == "c-aud"]
    assert aud and all(x["restricted"] is None for x in aud)
    for x in aud:
        k.check(c.delete(f"{sessions}/{x['id']}", headers=sec_h), sessions + "/{id}", 200)
    k.check(c.get("/v1/auth/me", headers=aud_h), "/v1/auth/me", 401)
    for ghost in (aud[0]["id"], "no-such-session"):
        k.check(c.delete(f"{sessions}/{ghost}", headers=sec_h), sessions + "/{id}", 404)

    # the caller's own API keys: only roles it holds, never an administrator's
    roles = "/v1/security/roles"
    k.check(c.post(roles, headers=sec_h, json={"name": "c-dev", "allow": [["model:x", "invoke"]]}), roles, 201)
    k.check(c.put(f"{users}/c-owner/roles", headers=sec_h, json={"roles": ["c-dev"]}), users + "/{name}/roles", 200)
    me_h = _login(c, k, "c-owner")
    mine = "/v1/security/me/keys"
    own = k.check(c.post(mine, headers=me_h, json={"name": "c-own", "roles": ["c-dev"], "days": 1}), mine, 201)
    assert own["key"] and own["roles"] == ["c-dev"]
    k.check(c.post(mine, headers=me_h, json={"name": "c-own2", "roles": ["sysadmin"]}), mine, 403)
    k.check(c.post(mine, headers=me_h, json={"name": "c-own3", "roles": ["c-dev"], "days": 0}), mine, 400)
    listed_k = k.check(c.get(mine, headers=me_h), mine, 200)["keys"]
    assert [x["id"] for x in listed_k] == [own["id"]]
    assert key["id"] in {x["id"] for x in k.check(c.get(mine, headers=sys_h), mine, 200)["keys"]}
    k.check(c.delete(f"{mine}/{key['id']}", headers=me_h), mine + "/{id}", 404)  # someone else's
    k.check(c.delete(f"{mine}/{own['id']}", headers=me_h), mine + "/{id}", 200)
    created = k.check(c.post(users, headers=sys_h, json={"name": "c-fresh"}), users, 201)
    fresh_h = _login(c, k, "c-fresh", created["one_time_password"])  # restricted to a password change
    assert k.check(c.get(mine, headers=fresh_h), mine, 200) == {"keys": []}
    k.check(c.post(mine, headers=fresh_h, json={"name": "c-no", "roles": ["c-dev"]}), mine, 403)


def test_all_operations_were_checked_and_a_wrong_answer_fails(client: TestClient, contract: Contract) -> None:
    """The validation is not vacuous: a real answer with a field of the wrong type, or missing, fails."""
    test_self_service_answers_match_the_contract(client, contract)
    test_administration_answers_match_the_contract(client, contract)
    test_audit_answers_match_the_contract(client, contract)
    test_groups_policy_and_own_keys_answers_match_the_contract(client, contract)
    ops = {(m, p) for p, item in contract.doc["paths"].items() if p.startswith(PREFIXES) for m in item}
    assert ops - contract.checked == set()

    h = _login(client, contract, "c-sys")
    body = client.get("/v1/security/users", headers=h).json()
    schema = contract.schema("GET", "/v1/security/users", 200)
    contract.validate(body, schema)
    for broken in ({**body["users"][0], "created_at": "yesterday"}, {**body["users"][0], "disabled": 0},
                   {k: v for k, v in body["users"][0].items() if k != "id"}):
        with pytest.raises(AssertionError):
            contract.validate({"users": [broken]}, schema)


def test_audit_query_beyond_64_bits_is_refused_not_a_server_error(client: TestClient, contract: Contract) -> None:
    """Found by schemathesis: an `after_seq` past 2**63 was echoed back as `next_after_seq` and the JSON
    encoder (orjson: 64-bit integers) failed, answering 500. The bound is in the contract now."""
    h = _login(client, contract, "c-aud")
    chain = client.get("/v1/audit/chains", headers=h).json()["chains"][0]["chain"]
    rec = "/v1/audit/records"
    big = 2**63
    for beyond in (2**64, 2963617799943697727488, big):
        contract.check(client.get(rec, headers=h, params={"chain": chain, "after_seq": beyond}), rec, 400)
    page = contract.check(client.get(rec, headers=h, params={"chain": chain, "after_seq": big - 1}), rec, 200)
    assert page == {"records": [], "next_after_seq": big - 1}
    schema = next(p for p in contract.doc["paths"][rec]["get"]["parameters"] if p["name"] == "after_seq")["schema"]
    assert schema["maximum"] == big - 1
