"""POST /v1/crypto/*: happy paths, permission hooks, and every bad-input path with its code."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.crypto import sm
from xcstack.crypto.routes import CryptoRoutes
from xcstack.security.guard import permission_of

from .conftest import OwnerProc

CAP = ["xcstack.crypto.capability"]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def err(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["code"] == code, body
    assert set(body) >= {"type", "code", "message"}
    return dict(body)


@pytest.fixture
def app_client(data_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(None, data_dir=data_dir, crypto={"access": "direct", "max_input_bytes": 4096})
    app = create_app(settings, CAP)
    with TestClient(app, raise_server_exceptions=False) as c:
        client = app.state.xc.services.crypto
        c.portal.call(client.create_key, "sig", "sm2")  # type: ignore[union-attr]
        c.portal.call(client.create_key, "enc", "sm4")  # type: ignore[union-attr]
        c.portal.call(client.create_key, "mac", "hmac-sm3")  # type: ignore[union-attr]
        yield c


def test_sign_verify_roundtrip(app_client: TestClient) -> None:
    r = app_client.post("/v1/crypto/sign", json={"key": "sig", "text": "hello", "uid": "alice"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and body["algorithm"] == "SM2" and body["format"] == "der"
    v = app_client.post(
        "/v1/crypto/verify", json={"key": "sig", "text": "hello", "uid": "alice", "signature": body["signature"]}
    )
    assert v.json() == {"key": "sig", "valid": True, "version": 1}
    v = app_client.post("/v1/crypto/verify", json={"key": "sig", "text": "hellO", "uid": "alice",
                                                   "signature": body["signature"]})
    assert v.status_code == 200 and v.json()["valid"] is False
    raw = app_client.post("/v1/crypto/sign", json={"key": "sig", "data": b64(b"\x00\x01"), "format": "raw"}).json()
    assert len(base64.b64decode(raw["signature"])) == 64


def test_encrypt_decrypt_sm4_and_sm2(app_client: TestClient) -> None:
    for key, extra in (("enc", {"aad": b64(b"ctx")}), ("sig", {})):
        r = app_client.post("/v1/crypto/encrypt", json={"key": key, "text": "secret", **extra})
        assert r.status_code == 200, r.text
        d = app_client.post("/v1/crypto/decrypt", json={"key": key, "ciphertext": r.json()["ciphertext"], **extra})
        assert d.status_code == 200, d.text
        assert base64.b64decode(d.json()["plaintext"]) == b"secret"


def test_hash_hmac_random(app_client: TestClient) -> None:
    assert app_client.post("/v1/crypto/hash", json={"text": "abc"}).json()["digest"] == sm.sm3(b"abc").hex()
    m = app_client.post("/v1/crypto/hmac", json={"key": "mac", "text": "abc"}).json()
    assert len(bytes.fromhex(m["mac"])) == 32 and m["algorithm"] == "HMAC-SM3"
    r = app_client.post("/v1/crypto/random", json={"n": 24}).json()
    assert len(base64.b64decode(r["random"])) == 24


def test_unknown_key_is_404(app_client: TestClient) -> None:
    err(app_client.post("/v1/crypto/sign", json={"key": "nope", "text": "x"}), 404, "key_not_found")


def test_wrong_key_type_is_400(app_client: TestClient) -> None:
    err(app_client.post("/v1/crypto/sign", json={"key": "enc", "text": "x"}), 400, "wrong_key_type")
    err(app_client.post("/v1/crypto/hmac", json={"key": "sig", "text": "x"}), 400, "wrong_key_type")


def test_malformed_signature_and_ciphertext_are_400(app_client: TestClient) -> None:
    err(app_client.post("/v1/crypto/verify", json={"key": "sig", "text": "x", "signature": b64(b"junk")}),
        400, "malformed_signature")
    err(app_client.post("/v1/crypto/decrypt", json={"key": "sig", "ciphertext": b64(b"\x30\x02\x01\x01")}),
        400, "malformed_ciphertext")
    err(app_client.post("/v1/crypto/verify", json={"key": "sig", "text": "x", "signature": "***"}),
        400, "invalid_base64")


def test_tampered_ciphertext_is_clean_400(app_client: TestClient) -> None:
    ct = base64.b64decode(app_client.post("/v1/crypto/encrypt", json={"key": "enc", "text": "s"}).json()["ciphertext"])
    bad = ct[:-1] + bytes([ct[-1] ^ 1])
    body = err(app_client.post("/v1/crypto/decrypt", json={"key": "enc", "ciphertext": b64(bad)}),
               400, "decryption_failed")
    assert "Traceback" not in body["message"]
    sct = base64.b64decode(app_client.post("/v1/crypto/encrypt", json={"key": "sig", "text": "s"}).json()["ciphertext"])
    bad = sct[:-1] + bytes([sct[-1] ^ 1])  # C2 body
    err(app_client.post("/v1/crypto/decrypt", json={"key": "sig", "ciphertext": b64(bad)}), 400, "decryption_failed")


def test_oversize_and_invalid_requests(app_client: TestClient) -> None:
    err(app_client.post("/v1/crypto/hash", json={"data": b64(b"x" * 5000)}), 400, "input_too_large")
    err(app_client.post("/v1/crypto/encrypt", json={"key": "sig", "plaintext": b64(b"x" * 300)}), 400,
        "invalid_crypto_input")
    err(app_client.post("/v1/crypto/hash", json={"text": "a", "data": "YQ=="}), 400, "invalid_parameter")
    err(app_client.post("/v1/crypto/sign", json={"key": "bad name", "text": "x"}), 400, "invalid_parameter")
    err(app_client.post("/v1/crypto/random", json={"n": 0}), 400, "invalid_parameter")
    err(app_client.post("/v1/crypto/random", json={"n": 1, "extra": 1}), 400, "invalid_parameter")
    err(app_client.post("/v1/crypto/sign", content=b"{not json"), 400, "invalid_json")


def test_endpoints_declare_permissions() -> None:
    for op in ("sign", "verify", "encrypt", "decrypt", "hash", "hmac", "random"):
        assert permission_of(getattr(CryptoRoutes, op)) == ("crypto", op)


def test_authorize_is_called_with_key_resource(data_dir: Path) -> None:
    """The security layer's authorizer (installed in the scope) sees `key:<name>` and the op."""
    from xcstack.errors import Forbidden

    seen: list[tuple[str, str]] = []

    async def authorizer(request: Any, resource: str, action: str) -> None:
        seen.append((resource, action))
        if resource == "key:sig" and action == "decrypt":
            raise Forbidden("no")

    settings = load_settings(None, data_dir=data_dir, crypto={"access": "direct"})
    app = create_app(settings, CAP)

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["xc.authorizer"] = authorizer
        await app(scope, receive, send)

    with TestClient(wrapper, raise_server_exceptions=False) as c:
        c.portal.call(app.state.xc.services.crypto.create_key, "sig", "sm2")
        assert c.post("/v1/crypto/sign", json={"key": "sig", "text": "x"}).status_code == 200
        r = c.post("/v1/crypto/decrypt", json={"key": "sig", "ciphertext": b64(b"x" * 120)})
        assert r.status_code == 403
    assert ("key:sig", "sign") in seen and ("key:sig", "decrypt") in seen


def test_http_through_owner_process_and_owner_down(owner: OwnerProc) -> None:
    settings = load_settings(None, data_dir=owner.data_dir, crypto={"call_timeout_s": 2.0})
    app = create_app(settings, CAP)
    with TestClient(app, raise_server_exceptions=False) as c:
        client = app.state.xc.services.crypto
        c.portal.call(client.create_key, "sig", "sm2")
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/crypto/sign", json={"key": "sig", "text": "hi"})
        assert r.status_code == 200, r.text
        err(c.post("/v1/crypto/sign", json={"key": "missing", "text": "hi"}), 404, "key_not_found")
        owner.kill()
        r = c.post("/v1/crypto/sign", json={"key": "sig", "text": "hi"})
        err(r, 503, "crypto_unavailable")
        assert "retry-after" in r.headers
        assert c.get("/readyz").status_code == 503
        owner.start()
        assert c.post("/v1/crypto/sign", json={"key": "sig", "text": "hi"}).status_code == 200


def test_key_listing_and_public_key_endpoint(app_client: TestClient) -> None:
    keys = app_client.get("/v1/crypto/keys").json()["keys"]
    assert {k["name"] for k in keys} == {"sig", "enc", "mac"}
    info = app_client.get("/v1/crypto/keys/sig").json()
    assert info["kind"] == "sm2" and info["version"] == 1
    pub = sm.SM2PublicKey.from_pem(info["pem"])
    s = app_client.post("/v1/crypto/sign", json={"key": "sig", "text": "x"}).json()["signature"]
    assert pub.verify(b"x", base64.b64decode(s))
    sym = app_client.get("/v1/crypto/keys/enc").json()
    assert sym["kind"] == "sm4" and sym["pem"] is None
    err(app_client.get("/v1/crypto/keys/nope"), 404, "key_not_found")
    err(app_client.get("/v1/crypto/keys/sig?version=x"), 400, "invalid_parameter")
    err(app_client.get("/v1/crypto/keys/sig?version=7"), 404, "key_not_found")
    err(app_client.get("/v1/crypto/keys/bad%20name"), 400, "invalid_crypto_input")
    assert permission_of(CryptoRoutes.list_keys) == ("crypto", "list")
    assert permission_of(CryptoRoutes.key_info) == ("crypto", "read")
