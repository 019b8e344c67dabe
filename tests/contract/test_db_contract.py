"""The db routes answer what their OpenAPI contract says: `GET /v1/db`, the query contract and the named
query (rows, a write's rowcount, the NDJSON stream, errors) validate against the documented schemas, and a
body the documented schema refuses is refused (`stream` is a JSON boolean, never `"true"`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from tests.contract.schema import Contract
from xcstack.app import create_app
from xcstack.config import load_settings

QUERY = "/v1/db/{database}/{query}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Contract]]:
    data = tmp_path_factory.mktemp("db")
    path = data / "items.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, price NUMERIC, "
                    "blob BLOB)")
        con.execute("INSERT INTO items VALUES (1, 'first', 1.5, x'00ff'), (2, 'second', NULL, NULL)")
    queries = {
        "by_id": {"sql": "SELECT id, name, price, blob, id FROM items WHERE id = :id", "description": "one item",
                  "params": {"id": {"type": "int", "min": 0, "max": 1000}}},
        "search": {"sql": "SELECT id, name FROM items WHERE name LIKE :prefix || '%' AND :kind = :kind "
                          "ORDER BY id", "max_rows": 1, "timeout_s": 5,
                   "params": {"prefix": {"type": "str", "max_length": 20, "pattern": "[a-z]*"},
                              "kind": {"type": "str", "required": False, "default": "a", "enum": ["a", "b"]}}},
        "add": {"sql": "INSERT INTO items (name) VALUES (:name)", "params": {"name": {"type": "str"}}},
    }
    settings = load_settings(None, data_dir=data, db={"databases": {"main": {
        "driver": "sqlite", "dsn": str(path), "pool_size": 1, "queries": queries}}})
    with TestClient(create_app(settings, ["xcstack.db.capability"]), raise_server_exceptions=False) as c:
        r = c.get("/openapi.json")
        assert r.status_code == 200
        yield c, Contract(r.json())


def test_every_db_operation_is_documented(served: tuple[TestClient, Contract]) -> None:
    _, contract = served
    ops = {(m, p): op for p, item in contract.doc["paths"].items() for m, op in item.items() if p.startswith("/v1/db")}
    assert set(ops) == {("get", "/v1/db"), ("get", QUERY), ("post", QUERY)}
    assert [k for k, op in ops.items() if op.get("x-xc-undocumented")] == []
    run = ops[("post", QUERY)]
    assert run["requestBody"]["required"] is False  # an empty body means no parameters
    assert "application/x-ndjson" in run["responses"]["200"]["content"]
    assert {"404", "409", "504"} <= set(run["responses"])


def test_listing_and_query_contract_match(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    listing = contract.check(c.get("/v1/db"), "get", "/v1/db")
    assert listing["databases"] == [{"name": "main", "driver": "sqlite", "shards": 1,
                                     "queries": ["add", "by_id", "search"]}]
    for name in ("by_id", "search", "add"):
        contract.check(c.get(f"/v1/db/main/{name}"), "get", QUERY)
    described = c.get("/v1/db/main/search").json()
    assert described["params"]["kind"]["enum"] == ["a", "b"] and described["timeout_s"] == 5
    r = c.get("/v1/db/main/nope")
    assert r.status_code == 404 and contract.check(r, "get", QUERY)["error"]["code"] == "unknown_query"


def test_query_answers_match(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    out = contract.check(c.post("/v1/db/main/by_id", json={"params": {"id": 1}}), "post", QUERY)
    assert out["columns"] == ["id", "name", "price", "blob", "id_2"]  # a repeated column gets a suffix
    assert out["rows"] == [{"id": 1, "name": "first", "price": 1.5, "blob": "AP8=", "id_2": 1}]
    out = contract.check(c.post("/v1/db/main/search", json={"params": {"prefix": ""}}), "post", QUERY)
    assert out["row_count"] == 1 and out["truncated"] is True
    out = contract.check(c.post("/v1/db/main/add", json={"params": {"name": "third"}}), "post", QUERY)
    assert out == {"database": "main", "query": "add", "rowcount": 1}
    r = c.post("/v1/db/main/add", json={"params": {"name": "third"}})
    assert r.status_code == 409 and contract.check(r, "post", QUERY)["error"]["code"] == "constraint_violation"
    r = c.post("/v1/db/main/by_id")  # an empty body: no parameters, and `id` is required
    assert r.status_code == 400 and contract.check(r, "post", QUERY)["error"]["param"] == "params.id"
    r = c.post("/v1/db/other/by_id", json={})
    assert r.status_code == 404 and contract.check(r, "post", QUERY)["error"]["code"] == "unknown_database"


def test_ndjson_stream_is_the_documented_media_type(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    r = c.post("/v1/db/main/search", json={"params": {"prefix": ""}, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    rows = [orjson.loads(line) for line in r.content.splitlines()]
    assert [row["id"] for row in rows] == [1, 2, 3]
    documented = contract.doc["paths"][QUERY]["post"]["responses"]["200"]["content"]
    assert r.headers["content-type"] in documented


@pytest.mark.parametrize("body", [
    {"stream": "true"},  # was coerced to a stream
    {"stream": 1},
    {"stream": None},
    {"params": [1]},
    {"sql": "DROP TABLE items"},
])
def test_a_body_the_schema_refuses_is_refused(served: tuple[TestClient, Contract], body: dict[str, Any]) -> None:
    c, contract = served
    schema = contract.doc["paths"][QUERY]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert contract.errors({"params": {"prefix": ""}, **body}, schema)
    r = c.post("/v1/db/main/search", json={"params": {"prefix": ""}, **body})
    assert r.status_code == 400, r.text
    assert contract.check(r, "post", QUERY)["error"]["code"] == "invalid_parameter"


def test_a_wrong_documented_field_is_caught(served: tuple[TestClient, Contract]) -> None:
    """The checks above are not vacuous: a field of the wrong type, or a missing one, fails the schemas."""
    c, contract = served
    rows = c.post("/v1/db/main/by_id", json={"params": {"id": 1}}).json()
    schema = contract.response_schema("post", QUERY, 200)
    assert not contract.errors(rows, schema)
    assert contract.errors({**rows, "truncated": "no"}, schema)
    assert contract.errors({k: v for k, v in rows.items() if k not in ("rows", "rowcount")}, schema)
    described = c.get("/v1/db/main/by_id").json()
    schema = contract.response_schema("get", QUERY, 200)
    assert not contract.errors(described, schema)
    assert contract.errors({**described, "params": {"id": {"type": "integer"}}}, schema)
    assert contract.errors({k: v for k, v in described.items() if k != "shard_key"}, schema)
