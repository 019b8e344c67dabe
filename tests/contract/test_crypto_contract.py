"""The crypto routes answer what their OpenAPI contract says: every /v1/crypto operation is documented
with its permission and the `key:<name>` check, real answers (successes and errors) validate against the
schema the document gives for their status (JSON Schema 2020-12, with the document's own components), and
the request schemas accept exactly what the endpoints accept."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any, Protocol

import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.crypto.routes import query_version
from xcstack.errors import BadRequest

DOC_URI = "urn:xcstack:openapi"
OPS = {  # path -> (method, permission, key check)
    "/v1/crypto/sign": ("post", "crypto:sign", "sign"),
    "/v1/crypto/verify": ("post", "crypto:verify", "verify"),
    "/v1/crypto/encrypt": ("post", "crypto:encrypt", "encrypt"),
    "/v1/crypto/decrypt": ("post", "crypto:decrypt", "decrypt"),
    "/v1/crypto/hash": ("post", "crypto:hash", None),
    "/v1/crypto/hmac": ("post", "crypto:hmac", "hmac"),
    "/v1/crypto/random": ("post", "crypto:random", None),
    "/v1/crypto/keys": ("get", "crypto:list", None),
    "/v1/crypto/keys/{name}": ("get", "crypto:read", "read"),
    "/v1/crypto/keys/{name}/rotate": ("post", "crypto:rotate", "rotate"),
}


class Answer(Protocol):
    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Contract:
    """Validates answers and request bodies against the document's schemas (refs resolved in the document)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(doc))

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        # the document's `#/components/...` refs resolve against the document itself
        return jsonschema.Draft202012Validator({"$id": "urn:xcstack:check", **self._rebase(schema)},
                                               registry=self.registry)

    def _rebase(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (DOC_URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#/") else self._rebase(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [self._rebase(v) for v in node]
        return node

    def response_schema(self, path: str, method: str, status: int) -> dict[str, Any]:
        op = self.doc["paths"][path][method]
        assert "x-xc-undocumented" not in op, f"{method.upper()} {path} has no contract"
        resp = op["responses"].get(str(status))
        assert resp is not None, f"{method.upper()} {path} answered {status}, which the document does not list"
        if "$ref" in resp:
            resp = self.doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
        schema = resp["content"]["application/json"]["schema"]
        assert schema, f"{method.upper()} {path} {status}: an empty schema documents nothing"
        return dict(schema)

    def check(self, path: str, method: str, r: Answer) -> Any:
        body = r.json()
        self._validator(self.response_schema(path, method, r.status_code)).validate(body)
        return body

    def body_ok(self, path: str, body: Any) -> bool:
        schema = self.doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return bool(self._validator(schema).is_valid(body))


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Contract:
    """The document with security on (permissions shown); built from the routes, no server needed."""
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("cdoc"), crypto={"access": "direct"},
                             security={"pbkdf2_iterations": 100_000})
    app = create_app(settings, ["xcstack.crypto.capability", "xcstack.security.capability"])
    return Contract(app.state.xc.openapi(app.routes))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("capp"),
                             crypto={"access": "direct", "max_input_bytes": 4096})
    app = create_app(settings, ["xcstack.crypto.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        crypto = app.state.xc.services.crypto
        for name, kind in (("sig", "sm2"), ("enc", "sm4"), ("mac", "hmac-sm3")):
            c.portal.call(crypto.create_key, name, kind)  # type: ignore[union-attr]
        c.portal.call(crypto.rotate_key, "enc")  # type: ignore[union-attr]
        yield c


def test_every_crypto_route_is_documented_with_its_permission(contract: Contract) -> None:
    crypto_paths = {path for path in contract.doc["paths"] if path.startswith("/v1/crypto")}
    assert crypto_paths == set(OPS)
    for path, (method, perm, key_action) in OPS.items():
        op = contract.doc["paths"][path][method]
        assert "x-xc-undocumented" not in op and op["x-xc-permission"] == perm, (path, op)
        assert f"Permission: `{perm}`." in op["description"]
        if key_action:
            assert f"`key:<name>` / `{key_action}`" in op["description"], path
            assert "404" in op["responses"], path
        assert contract.response_schema(path, method, 200)["$ref"].startswith("#/components/schemas/")
    query = [q for q in contract.doc["paths"]["/v1/crypto/keys/{name}"]["get"]["parameters"] if q["in"] == "query"]
    assert query == [{"name": "version", "in": "query", "required": False, "description": query[0]["description"],
                      "schema": {**query[0]["schema"], "type": "integer", "minimum": 1, "maximum": 2**31 - 1}}]


def test_answers_match_the_contract(client: TestClient, contract: Contract) -> None:
    def post(op: str, body: dict[str, Any], status: int = 200) -> Any:
        r = client.post(f"/v1/crypto/{op}", json=body)
        assert r.status_code == status, r.text
        return contract.check(f"/v1/crypto/{op}", "post", r)

    for fmt in ("der", "raw"):
        sig = post("sign", {"key": "sig", "text": "hello", "uid": "alice", "format": fmt})["signature"]
        assert post("verify", {"key": "sig", "text": "hello", "uid": "alice", "format": fmt, "signature": sig}) \
            == {"key": "sig", "valid": True, "version": 1}
    assert post("verify", {"key": "sig", "text": "other", "signature": sig, "format": "raw"})["version"] is None
    for key, fmt in (("enc", "der"), ("sig", "der"), ("sig", "c1c3c2"), ("sig", "c1c2c3")):
        ct = post("encrypt", {"key": key, "plaintext": b64(b"secret"), "format": fmt})["ciphertext"]
        assert post("decrypt", {"key": key, "ciphertext": ct, "format": fmt})["plaintext"] == b64(b"secret")
    assert post("hash", {"text": "abc"})["digest"] == \
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"  # GB/T 32905 vector
    assert post("hash", {"data": ""})["alg"] == "sm3"
    assert len(post("hmac", {"key": "mac", "data": b64(b"x")})["mac"]) == 64
    assert post("random", {"n": 1})["n"] == 1
    # errors: the documented error model with a documented code
    assert post("sign", {"key": "nope", "text": "x"}, 404)["error"]["code"] == "key_not_found"
    assert post("hmac", {"key": "sig", "text": "x"}, 400)["error"]["code"] == "wrong_key_type"
    assert post("decrypt", {"key": "enc", "ciphertext": "***"}, 400)["error"]["code"] == "invalid_base64"
    assert post("hash", {"data": b64(b"x" * 5000)}, 400)["error"]["code"] == "input_too_large"
    assert post("random", {"n": True}, 400)["error"]["code"] == "invalid_parameter"

    keys = contract.check("/v1/crypto/keys", "get", client.get("/v1/crypto/keys"))["keys"]
    assert {(k["name"], k["version"], k["versions"]) for k in keys} == {("sig", 1, 1), ("enc", 2, 2), ("mac", 1, 1)}
    info = "/v1/crypto/keys/{name}"
    for url in ("/v1/crypto/keys/sig", "/v1/crypto/keys/sig?version=1", "/v1/crypto/keys/enc",
                "/v1/crypto/keys/mac"):
        r = client.get(url)
        assert r.status_code == 200, r.text
        body = contract.check(info, "get", r)
        assert (body["pem"] is None) == (body["kind"] != "sm2")
    for url, status, code in (("/v1/crypto/keys/nope", 404, "key_not_found"),
                              ("/v1/crypto/keys/sig?version=2", 404, "key_not_found"),
                              ("/v1/crypto/keys/sig?version=0", 400, "invalid_parameter"),
                              ("/v1/crypto/keys/bad%20name", 400, "invalid_crypto_input")):
        r = client.get(url)
        assert r.status_code == status and contract.check(info, "get", r)["error"]["code"] == code
    rotate = "/v1/crypto/keys/{name}/rotate"
    r = client.post("/v1/crypto/keys/mac/rotate")
    assert r.status_code == 200 and contract.check(rotate, "post", r)["version"] == 2
    r = client.post("/v1/crypto/keys/nope/rotate")
    assert r.status_code == 404 and contract.check(rotate, "post", r)["error"]["code"] == "key_not_found"


def test_the_response_validation_is_not_vacuous(client: TestClient, contract: Contract) -> None:
    """A real answer with one documented field wrong must fail the check."""

    def fails(path: str, method: str, body: Any) -> None:
        class Fake:
            status_code = 200

            @staticmethod
            def json() -> Any:
                return body

        with pytest.raises(jsonschema.ValidationError):
            contract.check(path, method, Fake())

    fails("/v1/crypto/verify", "post", {"key": "sig", "valid": True})  # version: required (null when invalid)
    fails("/v1/crypto/verify", "post", {"key": "sig", "valid": 1, "version": 1})
    digest = client.post("/v1/crypto/hash", json={"text": "abc"}).json()
    fails("/v1/crypto/hash", "post", {**digest, "digest": digest["digest"].upper()})
    fails("/v1/crypto/hash", "post", {"alg": "sm3"})
    sym = client.get("/v1/crypto/keys/enc").json()
    fails("/v1/crypto/keys/{name}", "get", {k: v for k, v in sym.items() if k != "pem"})
    fails("/v1/crypto/keys/{name}", "get", {**sym, "version": 0})
    keys = client.get("/v1/crypto/keys").json()
    fails("/v1/crypto/keys", "get", {"keys": [{**keys["keys"][0], "created_at": "yesterday"}]})
    fails("/v1/crypto/random", "post", {"n": 4, "random": "not base64!"})


# Not here: {"n": 16.0} is an integer to JSON Schema but refused by the strict models (400, not coerced:
# tests/crypto/test_hardening.py); schema-valid and refused is the safe direction for a fuzzer.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("hash", {"text": "abc"}),
    ("hash", {"data": "YWJj", "text": None}),
    ("hash", {"data": None, "text": "abc", "alg": "sm3"}),
    ("hash", {"data": "YWJj", "text": "abc"}),
    ("hash", {}),
    ("hash", {"data": None, "text": None}),
    ("hash", {"data": 1}),
    ("hash", {"text": "abc", "alg": "sha256"}),
    ("hash", {"text": "abc", "encoding": "utf8"}),
    ("hash", {"data": ""}),
    ("hash", {"data": "YWI="}),
    ("hash", {"data": "YQ=="}),
    ("hash", {"data": "YWJ"}),
    ("hash", {"data": "YWJj="}),  # excess padding: base64.b64decode(validate=True) alone took it
    ("hash", {"data": "YW=="}),
    ("hash", {"data": "YW Jj"}),
    ("hash", {"data": "YW_j"}),
    ("sign", {"key": "sig", "text": "x", "version": 1, "format": "raw", "uid": "alice"}),
    ("sign", {"key": "sig", "text": "x", "version": True}),
    ("sign", {"key": "sig", "text": "x", "version": 2**31}),
    ("sign", {"key": "bad name", "text": "x"}),
    ("sign", {"key": "sig", "text": "x", "uid": ""}),
    ("verify", {"key": "sig", "data": "AA==", "signature": "AA=="}),
    ("verify", {"key": "sig", "data": "AA==", "signature": "AA="}),
    ("verify", {"key": "sig", "data": "AA=="}),
    ("verify", {"key": "sig", "signature": "AA=="}),
    ("encrypt", {"key": "enc", "plaintext": "AA==", "aad": "AA==", "format": "c1c2c3"}),
    ("encrypt", {"key": "enc", "plaintext": "AA==", "aad": "AA=A"}),
    ("encrypt", {"key": "enc", "plaintext": "AA==", "text": "x"}),
    ("encrypt", {"key": "enc", "data": "AA=="}),
    ("encrypt", {"key": "enc", "text": True}),
    ("decrypt", {"key": "enc", "ciphertext": "AA==", "version": 3}),
    ("decrypt", {"key": "enc", "ciphertext": "AA===="}),
    ("decrypt", {"key": "enc", "ciphertext": ""}),
    ("decrypt", {"key": "enc"}),
    ("hmac", {"key": "mac", "text": "x"}),
    ("hmac", {"key": "mac"}),
    ("random", {"n": 4096}),
    ("random", {"n": 4097}),
    ("random", {"n": "16"}),
]
REFUSED_AS_INVALID = {"invalid_parameter", "invalid_base64"}


@pytest.mark.parametrize(("op", "body"), REQUESTS)
def test_request_schema_accepts_exactly_what_the_endpoint_accepts(
    client: TestClient, contract: Contract, op: str, body: dict[str, Any]
) -> None:
    """A schema-valid body gets past the endpoint's input checks (it may still be a 404 or a crypto error),
    and a schema-invalid one is refused by them: the one-of-`data`/`text` rule and the base64 pattern too."""
    r = client.post(f"/v1/crypto/{op}", json=body)
    assert r.status_code < 500, r.text
    refused = r.status_code == 400 and r.json()["error"]["code"] in REFUSED_AS_INVALID
    assert contract.body_ok(f"/v1/crypto/{op}", body) is not refused, (op, body, r.text)


@pytest.mark.parametrize("value", [1, 7, 2**31 - 1, 0, -1, 2**31, 10**20])
def test_version_query_schema_matches_the_endpoint(contract: Contract, value: int) -> None:
    param = next(q for q in contract.doc["paths"]["/v1/crypto/keys/{name}"]["get"]["parameters"]
                 if q["name"] == "version")
    try:
        accepted = query_version(str(value)) == value
    except BadRequest:
        accepted = False
    assert jsonschema.Draft202012Validator(param["schema"]).is_valid(value) is accepted
