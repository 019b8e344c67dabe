"""The vector routes parse bodies with the strict models of protocol.py, on both engines: JSON types are
what they say, NUL characters never reach the engine (pgvector answered 500), names and payload keys
match their whole pattern, and a type error keeps the error code the service gives that field."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vector.conftest import VecApp
from xcstack.errors import BadRequest

DIM = 4
GOOD = [0.1, 0.2, 0.3, 0.4]


async def _setup(v: VecApp) -> None:
    r = await v.client.post("/v1/vectors/collections", json={"name": "docs", "dimension": DIM})
    assert r.status_code == 201, r.text
    r = await v.client.post("/v1/vectors/docs/upsert", json={"ids": ["a"], "vectors": [GOOD], "payloads": [{"n": 1}]})
    assert r.status_code == 200, r.text


def _err(r: Any, code: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code, err
    return str(err.get("param"))


async def test_nul_characters_are_refused_before_the_engine(vapp: VecApp) -> None:
    c = vapp.client
    await _setup(vapp)
    _err(
        await c.post("/v1/vectors/collections", json={"name": "x", "dimension": 2, "description": "a\u0000"}),
        "invalid_parameter",
    )
    _err(await c.post("/v1/vectors/docs/upsert", json={"ids": ["a\u0000"], "vectors": [GOOD]}), "invalid_id")
    for payload in ({"t": "x\u0000"}, {"t": {"deep": ["ok", "\u0000"]}}):
        r = await c.post("/v1/vectors/docs/upsert", json={"ids": ["b"], "vectors": [GOOD], "payloads": [payload]})
        assert _err(r, "invalid_parameter") == "payloads"
    _err(await c.post("/v1/vectors/docs/search", json={"vector": GOOD, "filter": 'id == "\u0000"'}), "invalid_filter")
    _err(await c.post("/v1/vectors/docs/delete", json={"ids": ["\u0000"]}), "invalid_id")
    _err(await c.post("/v1/vectors/docs/delete", json={"filter": 'n == "\u0000"'}), "invalid_filter")
    _err(await c.get("/v1/vectors/docs/export", params={"filter": 'id == "\u0000"'}), "invalid_filter")
    # nothing was written, and a payload string without NUL is stored as is
    r = await c.post("/v1/vectors/docs/upsert", json={"ids": ["b"], "vectors": [GOOD], "payloads": [{"t": "x\\0"}]})
    assert r.status_code == 200, r.text
    rows = (await c.get("/v1/vectors/docs/export", params={"vectors": "false"})).text.splitlines()
    assert sorted(rows) == ['{"id":"a","payload":{"n":1}}', '{"id":"b","payload":{"t":"x\\\\0"}}']


@pytest.mark.parametrize(
    ("url", "body", "code"),
    [
        ("/v1/vectors/docs/upsert", {"vectors": [[True, 0.2, 0.3, 0.4]]}, "invalid_vector"),  # was [1, .2, .3, .4]
        ("/v1/vectors/docs/search", {"vector": [0.1, 0.2, 0.3, False]}, "invalid_vector"),
        ("/v1/vectors/docs/search", {"vectors": [[1, 0, 0, True]]}, "invalid_vector"),
        ("/v1/vectors/docs/search", {"vector": GOOD, "top_k": True}, "invalid_parameter"),
        ("/v1/vectors/docs/search", {"vector": GOOD, "top_k": "5"}, "invalid_parameter"),
        ("/v1/vectors/docs/search", {"vector": GOOD, "ef": 50.0}, "invalid_parameter"),
        ("/v1/vectors/docs/search", {"vector": GOOD, "include_vectors": "true"}, "invalid_parameter"),
        ("/v1/vectors/docs/search", {"vector": GOOD, "filter": 5}, "invalid_filter"),
        ("/v1/vectors/docs/upsert", {"ids": [1], "vectors": [GOOD]}, "invalid_id"),
        ("/v1/vectors/collections", {"name": "x", "dimension": True}, "invalid_vector"),
        ("/v1/vectors/collections", {"name": "x", "dimension": 4, "metric": ""}, "invalid_parameter"),  # was cosine
        ("/v1/vectors/collections", {"name": "x", "dimension": 4, "metric": "L2"}, "invalid_parameter"),
    ],
)
async def test_json_types_are_strict_and_keep_their_codes(
    vapp: VecApp, url: str, body: dict[str, Any], code: str
) -> None:
    await _setup(vapp)
    _err(await vapp.client.post(url, json=body), code)
    assert (await vapp.client.get("/v1/vectors/collections")).json()["data"] == ["docs"]
    assert (await vapp.client.get("/v1/vectors/collections/docs")).json()["count"] == 1


async def test_names_and_fields_match_their_whole_pattern(vapp: VecApp) -> None:
    """`re.match` with `$` accepted a trailing newline: `"a\\n"` was created as a collection."""
    c = vapp.client
    await _setup(vapp)
    _err(await c.post("/v1/vectors/collections", json={"name": "x\n", "dimension": 2}), "invalid_collection_name")
    _err(await c.get("/v1/vectors/collections/docs%0A"), "invalid_collection_name")
    _err(await c.post("/v1/vectors/docs%0A/search", json={"vector": GOOD}), "invalid_collection_name")
    r = await c.post("/v1/vectors/docs/upsert", json={"vectors": [GOOD], "payloads": [{"n\n": 1}]})
    assert _err(r, "invalid_parameter").startswith("payloads")
    _err(await c.post("/v1/vectors/docs/search", json={"vector": GOOD, "output_fields": ["n\n"]}), "invalid_parameter")
    # the service (which the benchmark and other capabilities call directly) checks the same
    service = vapp.cap.service
    with pytest.raises(BadRequest):
        await service.upsert("docs", vectors=[GOOD], payloads=[{"n\n": 1}])
    with pytest.raises(BadRequest):
        await service.search("docs", vectors=[GOOD], output_fields=["n\n"])
    assert (await c.get("/v1/vectors/collections")).json()["data"] == ["docs"]
