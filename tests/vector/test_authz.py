"""Every vector route declares its coarse permission and checks the collection (fine-grained);
create/drop/index are audited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request

from tests.vector.conftest import vector_settings
from xcstack.errors import Forbidden
from xcstack.security.guard import permission_of


async def test_permissions_and_collection_checks(data_dir: Path) -> None:
    from xcstack.app import create_app

    app = create_app(vector_settings("milvus", data_dir), capability_modules=["xcstack.vector.capability"])
    perms = {
        (r.path, tuple(sorted(r.methods or ()))): permission_of(r.endpoint)
        for r in app.routes
        if r.path.startswith("/v1/vectors")  # type: ignore[attr-defined]
    }
    assert all(p is not None and p[0] == "vector" for p in perms.values()), perms
    assert perms[("/v1/vectors/{collection}/search", ("POST",))] == ("vector", "read")
    assert perms[("/v1/vectors/{collection}/upsert", ("POST",))] == ("vector", "write")
    assert perms[("/v1/vectors/collections", ("POST",))] == ("vector", "admin")
    assert perms[("/v1/vectors/collections/{name}", ("DELETE",))] == ("vector", "admin")

    checks: list[tuple[str, str]] = []
    audits: list[tuple[str, str, str]] = []

    async def authorizer(request: Request, resource: str, action: str) -> None:
        checks.append((resource, action))
        if resource == "collection:secret":
            raise Forbidden(f"no {action} on {resource}")

    async def audit(request: Request, action: str, resource: str, outcome: str, detail: Any) -> None:
        audits.append((action, resource, outcome))

    async def with_security(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["xc.authorizer"] = authorizer
            scope["xc.audit"] = audit
        await app(scope, receive, send)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=with_security)
        async with httpx.AsyncClient(transport=transport, base_url="http://xc") as c:
            r = await c.post("/v1/vectors/collections", json={"name": "open", "dimension": 4})
            assert r.status_code == 201
            r = await c.post("/v1/vectors/open/upsert", json={"vectors": [[1, 2, 3, 4]]})
            assert r.status_code == 200
            r = await c.post("/v1/vectors/open/search", json={"vector": [1, 2, 3, 4]})
            assert r.status_code == 200
            r = await c.post("/v1/vectors/secret/search", json={"vector": [1, 2, 3, 4]})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            r = await c.post("/v1/vectors/collections", json={"name": "secret", "dimension": 4})
            assert r.status_code == 403
            r = await c.delete("/v1/vectors/collections/open")
            assert r.status_code == 200
    assert checks == [
        ("collection:open", "admin"),
        ("collection:open", "write"),
        ("collection:open", "read"),
        ("collection:secret", "read"),
        ("collection:secret", "admin"),
        ("collection:open", "admin"),
    ]
    assert audits == [
        ("vector.collection.create", "collection:open", "ok"),
        ("vector.collection.drop", "collection:open", "ok"),
    ]
