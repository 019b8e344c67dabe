"""Bad numbers and wrong JSON types on /v1/crypto are 400 JSON, never a 500 or a silent coercion
(issue 12, findings 7 and 11)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings

from .test_http import err


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(None, data_dir=data_dir, crypto={"access": "direct"})
    app = create_app(settings, ["xcstack.crypto.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        crypto = app.state.xc.services.crypto
        c.portal.call(crypto.create_key, "sig", "sm2")  # type: ignore[union-attr]
        c.portal.call(crypto.create_key, "enc", "sm4")  # type: ignore[union-attr]
        yield c


@pytest.mark.parametrize(
    "raw",
    ["²", "١", "99999999999999999999", "", "2147483648", "0", "-1", "+1", " 1", "1.0", "0x1", "abc"],
)
def test_key_version_query_is_bounded_ascii(client: TestClient, raw: str) -> None:
    body = err(client.get("/v1/crypto/keys/sig", params={"version": raw}), 400, "invalid_parameter")
    assert body["param"] == "version" and "2147483647" in body["message"]


def test_key_version_query_accepts_real_versions(client: TestClient) -> None:
    r = client.get("/v1/crypto/keys/sig", params={"version": "1"})
    assert r.status_code == 200, r.text
    assert client.get("/v1/crypto/keys/sig").json()["name"] == "sig"  # no version: the current one
    err(client.get("/v1/crypto/keys/sig", params={"version": "2147483647"}), 404, "key_not_found")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/crypto/random", {"n": True}, "n"),
        ("/v1/crypto/random", {"n": "16"}, "n"),
        ("/v1/crypto/random", {"n": 16.0}, "n"),
        ("/v1/crypto/sign", {"key": "sig", "text": "x", "version": True}, "version"),
        ("/v1/crypto/sign", {"key": "sig", "text": "x", "version": 2**31}, "version"),
        ("/v1/crypto/sign", {"key": "sig", "text": 5}, "text"),
        ("/v1/crypto/verify", {"key": "sig", "text": "x", "signature": "AA==", "version": "1"}, "version"),
        ("/v1/crypto/encrypt", {"key": "enc", "text": True}, "text"),
        ("/v1/crypto/decrypt", {"key": "enc", "ciphertext": "AA==", "version": 99999999999999999999}, "version"),
        ("/v1/crypto/hash", {"data": 1}, "data"),
    ],
)
def test_strict_json_types(client: TestClient, path: str, body: dict[str, Any], param: str) -> None:
    got = err(client.post(path, json=body), 400, "invalid_parameter")
    assert got["param"] == param, got


def test_well_typed_requests_still_work(client: TestClient) -> None:
    r = client.post("/v1/crypto/random", json={"n": 16})
    assert r.status_code == 200 and r.json()["n"] == 16
    r = client.post("/v1/crypto/sign", json={"key": "sig", "text": "x", "version": 1, "format": "raw"})
    assert r.status_code == 200, r.text
