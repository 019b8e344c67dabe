"""`xcstack user key create USER --role R --days N` issues an API key offline, as the API path does: owned
by the user, never with a right the user lacks, audited (and naming the operator), and it authenticates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings

from .conftest import audit_records


def _xc(data: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XC_DATA_DIR": str(data), "XC_SECURITY__PBKDF2_ITERATIONS": "100000",
           "XC_CRYPTO__ACCESS": "direct"}
    return subprocess.run([sys.executable, "-m", "xcstack", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_offline_key_authenticates_and_is_audited(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert _xc(data, "user", "create", "ops-bot", "--role", "sysadmin", "--kind", "service").returncode == 0
    out = _xc(data, "user", "key", "create", "ops-bot", "--role", "sysadmin", "--days", "2")
    assert out.returncode == 0, out.stderr
    key = out.stdout.split()[-1]
    assert "ops-bot" in out.stdout and len(key) > 40
    refused = _xc(data, "user", "key", "create", "ops-bot", "--role", "auditor")  # a right ops-bot lacks
    assert refused.returncode != 0 and "auditor" in refused.stderr
    assert _xc(data, "user", "key", "create", "nobody", "--role", "sysadmin").returncode == 1

    settings = load_settings(None, data_dir=data, security={"pbkdf2_iterations": 100_000}, crypto={"access": "direct"})
    with TestClient(create_app(settings, ["xcstack.crypto.capability", "xcstack.security.capability"])) as c:
        r = c.get("/v1/security/users", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and "ops-bot" in {u["name"] for u in r.json()["users"]}
        assert c.get("/v1/auth/me", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    records = audit_records(data / "audit")
    created = [r for r in records if r["action"] == "apikey.create" and r["outcome"] == "success"]
    offline = [r for r in records if r["action"] == "apikey.issue_offline"]
    denied = [r for r in records if r["action"] == "apikey.create" and r["outcome"] == "denied"]
    assert created and created[0]["actor"] == "ops-bot"
    assert offline and offline[0]["actor"].startswith("cli:") and offline[0]["detail"]["owner"] == "ops-bot"
    assert denied and denied[0]["detail"]["roles"] == ["auditor"]
