"""A real `xcstack serve` with every capability on and security on, for the contract tests: the gateway
in front of `xcstack mock-upstream` (the LLM test double), the imported default embedding models and a
tensor model in model worker processes, Milvus Lite, a SQLite database with named queries, the soft HSM.

`FullStack.start()` also signs in a service account whose role holds every right a custom role may
hold, so a fuzzer reaches every operation past RBAC (denials are tested elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.core.served import Served

PASSWORD = "Fuzz-Pass-2024!x"
NEW_PASSWORD = "Fuzz-Pass-2025!y"
# every right a custom role may hold (三权分立 keeps security.* and audit to the built-in roles)
ALL_BUT_ADMIN = [[r, "*"] for r in ("route:/v1/*", "route:/v2", "route:/v2/*", "model:*", "inference", "vector",
                                   "collection:*", "crypto", "key:*", "db", "query:*")]


def _config(data: Path, upstream_port: int, sqlite: Path) -> str:
    return f"""
[security]
pbkdf2_iterations = 100000

[gateway]
[[gateway.upstreams]]
name = "mock"
base_url = "http://127.0.0.1:{upstream_port}/v1"
models = ["mock-model"]
embeddings = false

[inference]
workers = 1
request_timeout_s = 10

[db.databases.main]
driver = "sqlite"
dsn = "{sqlite}"
pool_size = 2

[db.databases.main.queries.item_by_id]
sql = "SELECT id, name FROM items WHERE id = :id"
description = "one item"
[db.databases.main.queries.item_by_id.params.id]
type = "int"
min = 0
max = 1000000

[db.databases.main.queries.add_item]
sql = "INSERT INTO items (name) VALUES (:name)"
[db.databases.main.queries.add_item.params.name]
type = "str"
max_length = 64
"""


class FullStack:
    def __init__(self, root: Path, model_repo: Path, server: str = "uvicorn") -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        models = self.data / "models"
        if not models.exists():  # links, not a copy: the cached import is ~500 MB and the server only reads it
            models.mkdir()
            for entry in sorted(model_repo.iterdir()):
                if (entry / "config.json").is_file():
                    (models / entry.name).symlink_to(entry, target_is_directory=True)
        from tests.inference.conftest import make_scale_model

        if not (models / "scale").exists():
            make_scale_model(models, "scale")
        sqlite = root / "items.db"
        import sqlite3

        with sqlite3.connect(sqlite) as con:
            con.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
            con.execute("INSERT INTO items (name) VALUES ('first')")
        self.upstream_port = free_port()
        self.config = root / "xcstack.toml"
        self.config.write_text(_config(self.data, self.upstream_port, sqlite))
        self.upstream: subprocess.Popen[bytes] | None = None
        self.served = Served(self.data, env={
            "XC_CONFIG": str(self.config),
            "XC_SECURITY__ENABLED": "true",
            "XC_SERVER__PLUGINS": "[]",
            "XC_SERVER__WORKERS": "1",
            # the administrators' second factor is tested in tests/security; here it would only slow the set-up
            "XC_SECURITY__TOTP_REQUIRED": "false",
        }, server=server, plugins="[]")
        self.token = ""
        self.admin_tokens: dict[str, str] = {}

    @property
    def base(self) -> str:
        return self.served.base

    def start(self) -> FullStack:
        self.upstream = subprocess.Popen(
            [sys.executable, "-m", "xcstack", "mock-upstream", "--port", str(self.upstream_port),
             "--ttft", "0.001", "--tokens", "8", "--models", "mock-model"],
            env={**os.environ, "XC_DATA_DIR": str(self.data)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.served.start(timeout=180)
        self.token = self._sign_in()
        return self

    def stop(self) -> None:
        self.served.stop()
        if self.upstream is not None:
            self.upstream.terminate()
            self.upstream.wait(10)

    def _bootstrap_password(self, user: str) -> str:
        for line in self.served.output:  # "  admin      role sysadmin  password XXXX"
            parts = line.split()
            if len(parts) == 5 and parts[0] == user and parts[1] == "role" and parts[3] == "password":
                return parts[4]
        raise AssertionError(f"no one-time password for {user} in:\n" + "".join(self.served.output[-40:]))

    def _sign_in(self) -> str:
        """Create that role and account as the bootstrap administrators would, and sign it in."""
        with httpx.Client(base_url=self.base, timeout=30) as c:
            for who in ("admin", "secadmin", "auditor"):
                self.admin_tokens[who] = self._login(c, who, self._bootstrap_password(who))
            admin, secadmin = self.admin_tokens["admin"], self.admin_tokens["secadmin"]
            h = {"Authorization": f"Bearer {secadmin}"}
            r = c.post("/v1/security/roles", headers=h, json={
                "name": "contract-all", "allow": ALL_BUT_ADMIN, "description": "contract tests: every operation"})
            assert r.status_code == 201, r.text
            r = c.post("/v1/security/users", headers={"Authorization": f"Bearer {admin}"},
                       json={"name": "contract", "kind": "service", "password": PASSWORD})
            assert r.status_code == 201, r.text
            r = c.put("/v1/security/users/contract/roles", headers=h, json={"roles": ["contract-all"]})
            assert r.status_code == 200, r.text
            # a session, not a key: custom roles may not manage keys (security.* is the administrators')
            return self._login(c, "contract", PASSWORD)

    @staticmethod
    def _login(c: httpx.Client, user: str, password: str) -> str:
        r = c.post("/v1/auth/login", json={"username": user, "password": password})
        assert r.status_code == 200, r.text
        out = r.json()
        if out.get("restricted") == "password_change":
            h = {"Authorization": f"Bearer {out['token']}"}
            r = c.post("/v1/auth/password", headers=h, json={"old_password": password, "new_password": NEW_PASSWORD})
            assert r.status_code == 200, r.text
            time.sleep(0.01)
            return FullStack._login(c, user, NEW_PASSWORD)
        return str(out["token"])
