"""The db capability inside the real app (create_app): routes mounted, bridge started and stopped
with the app, readiness reported, the bridge published to other capabilities."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import aiohttp

from tests.db.conftest import serve
from xcstack.app import create_app
from xcstack.capability import AppContext
from xcstack.config import load_settings
from xcstack.db import capability
from xcstack.db.bridge import Bridge


def test_disabled_without_databases(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path)
    ctx = AppContext(settings=settings, state=None)  # type: ignore[arg-type]
    assert capability.create(ctx) is None


async def test_in_the_app(tmp_path: Path) -> None:
    db_file = tmp_path / "xcdb.sqlite"
    settings = load_settings(None, data_dir=tmp_path, db={"databases": {"main": {
        "driver": "sqlite", "dsn": str(db_file), "pool_size": 2,
        "queries": {"hello": {"sql": "SELECT 'hi ' || :who AS greeting", "params": {"who": {"type": "str"}}}},
    }}})
    app = create_app(settings, ["xcstack.db.capability"])
    xc = app.state.xc
    assert isinstance(next(c for c in xc.capabilities if isinstance(c, capability.DbCapability)).bridge, Bridge)
    async with serve(app, lifespan="on") as base, aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/db/main/hello", json={"params": {"who": "xc"}}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["rows"] == [{"greeting": "hi xc"}]
        async with s.post(f"{base}/v1/db/main/hello", json={"params": {}}) as r:
            body = json.loads(await r.read())
            assert r.status == 400 and body["error"]["code"] == "invalid_parameter"
        async with s.post(f"{base}/v1/db/main/nope", json={}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_query"
        async with s.get(f"{base}/readyz") as r:
            assert (await r.json())["checks"]["db"]["ready"] is True
        async with s.get(f"{base}/metrics") as r:
            assert 'xc_db_queries_total{database="main",outcome="ok",query="hello"}' in await r.text()
    assert not [t for t in threading.enumerate() if t.name.startswith("xc-db-main") and t.is_alive()]
