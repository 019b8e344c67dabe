"""Numbers at the edges of JSON, on both engines: a payload number wider than 64 bits once stored (jsonb
keeps 1e20 as an integer) is answered as the float it was sent as, not a 500; a filter number that is
not finite (1e400) or not a 64-bit integer is a 400, not an engine failure."""

from __future__ import annotations

import orjson

from tests.vector.conftest import VecApp

GOOD = [0.1, 0.2, 0.3, 0.4]


async def test_wide_payload_numbers_round_trip(vapp: VecApp) -> None:
    c = vapp.client
    assert (await c.post("/v1/vectors/collections", json={"name": "docs", "dimension": 4})).status_code == 201
    payload = {"big": 1e20, "huge": 1e308, "small": 12, "neg": -1e19}
    r = await c.post("/v1/vectors/docs/upsert", json={"ids": ["a"], "vectors": [GOOD], "payloads": [payload]})
    assert r.status_code == 200, r.text
    r = await c.post("/v1/vectors/docs/search", json={"vector": GOOD, "top_k": 1, "output_fields": list(payload)})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["payload"] == payload
    r = await c.get("/v1/vectors/docs/export", params={"vectors": "false"})
    assert r.status_code == 200 and orjson.loads(r.content.splitlines()[0])["payload"] == payload


async def test_filter_numbers_out_of_range_are_400(vapp: VecApp) -> None:
    """pgvector compiles filters itself (1e400 became inf: a 500); Milvus gets the filter as written and
    answers it (never a 5xx either)."""
    c = vapp.client
    pg = vapp.settings.vector.backend == "pgvector"
    assert (await c.post("/v1/vectors/collections", json={"name": "docs", "dimension": 4})).status_code == 201
    for bad in ("u > 1e400", "u < -1e999", "u == 99999999999999999999999"):
        for r in (await c.post("/v1/vectors/docs/search", json={"vector": GOOD, "filter": bad}),
                  await c.get("/v1/vectors/docs/export", params={"filter": bad})):
            if pg:
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_filter", (bad, r.text)
            else:
                assert r.status_code in (200, 400), (bad, r.text)
