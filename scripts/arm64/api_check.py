#!/usr/bin/env python3
"""SM2 sign + verify through a running xcstack's API, signing in the way a new site does (stdlib only).

    api_check.py BASE_URL BOOTSTRAP_OUTPUT KEY   # BOOTSTRAP_OUTPUT: what `xcstack user bootstrap` printed

The bootstrap administrators change their one-time passwords and enrol TOTP (required for human accounts
by default); secadmin creates a role allowed to sign with KEY, admin a service account that secadmin gives
that role; the service account signs and verifies. Prints one JSON line; exit 1 when a step fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import sys
import time
import urllib.error
import urllib.request
from typing import Any

NEW_PASSWORD = "Arm64-Check-2025!x"
SERVICE_PASSWORD = "Arm64-Service-2025!y"


def call(base: str, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None,
         want: int = 200) -> dict[str, Any]:
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if status != want:
        raise SystemExit(json.dumps({"ok": False, "step": f"{method} {path}", "status": status, "body": text}))
    return json.loads(text) if text else {}


def totp(secret_b32: str, at: float | None = None) -> str:
    """RFC 6238 (SHA-1, 30 s, 6 digits), what an authenticator app computes."""
    key = base64.b32decode(secret_b32.upper() + "=" * (-len(secret_b32) % 8))
    digest = hmac.new(key, struct.pack(">Q", int((at or time.time()) // 30)), hashlib.sha1).digest()
    off = digest[-1] & 0x0F
    return f"{(struct.unpack('>I', digest[off:off + 4])[0] & 0x7FFFFFFF) % 1_000_000:06d}"


def sign_in(base: str, user: str, password: str) -> str:
    """Login; change the one-time password and enrol TOTP when the session says so."""
    out = call(base, "POST", "/v1/auth/login", {"username": user, "password": password})
    token = str(out["token"])
    if out.get("restricted") == "password_change":
        call(base, "POST", "/v1/auth/password", {"old_password": password, "new_password": NEW_PASSWORD}, token)
        out = call(base, "GET", "/v1/auth/me", token=token)
    if out.get("restricted") == "totp_enrollment" or (out.get("session") or {}).get("restricted") == "totp_enrollment":
        secret = call(base, "POST", "/v1/auth/totp/enroll", token=token)["secret"]
        call(base, "POST", "/v1/auth/totp/confirm", {"code": totp(secret)}, token)
    return token


def main() -> int:
    base, bootstrap_file, key = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
    passwords = {}
    for line in open(bootstrap_file, encoding="utf-8"):  # "  admin      role sysadmin  password XXXX"
        parts = line.split()
        if len(parts) == 5 and parts[1] == "role" and parts[3] == "password":
            passwords[parts[0]] = parts[4]
    admin, secadmin = sign_in(base, "admin", passwords["admin"]), sign_in(base, "secadmin", passwords["secadmin"])
    call(base, "POST", "/v1/security/roles", {"name": "arm64-signer", "allow": [["crypto", "*"], [f"key:{key}", "*"]],
                                              "description": "make test-arm64"}, secadmin, want=201)
    call(base, "POST", "/v1/security/users", {"name": "arm64svc", "kind": "service", "password": SERVICE_PASSWORD},
         admin, want=201)
    call(base, "PUT", "/v1/security/users/arm64svc/roles", {"roles": ["arm64-signer"]}, secadmin)
    out = call(base, "POST", "/v1/auth/login", {"username": "arm64svc", "password": SERVICE_PASSWORD})
    svc = str(out["token"])
    if out.get("restricted") == "password_change":
        call(base, "POST", "/v1/auth/password", {"old_password": SERVICE_PASSWORD, "new_password": NEW_PASSWORD}, svc)
    text = "信创 arm64 " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    signed = call(base, "POST", "/v1/crypto/sign", {"key": key, "text": text}, svc)
    sign_ms = (time.perf_counter() - t0) * 1000
    good = call(base, "POST", "/v1/crypto/verify", {"key": key, "text": text, "signature": signed["signature"]}, svc)
    bad = call(base, "POST", "/v1/crypto/verify", {"key": key, "text": text + "!", "signature": signed["signature"]},
               svc)
    ok = signed["algorithm"] == "SM2" and good["valid"] is True and bad["valid"] is False
    print(json.dumps({"ok": ok, "algorithm": signed["algorithm"], "valid": good["valid"],
                      "tampered_valid": bad["valid"], "sign_ms": round(sign_ms, 1),
                      "signature": signed["signature"], "text": text}, ensure_ascii=False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
