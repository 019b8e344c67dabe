"""Filters that an engine rejects are 400 JSON on every route, also the export stream, and nesting is
bounded before Milvus Lite's recursive parser overflows; an export that fails after it started ends
with an error line and is audited as a failure (issue 12, finding 6). Both engines."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request

from tests.vector.conftest import VecApp, structured
from xcstack.vector.filters import MAX_DEPTH, check_filter
from xcstack.vector.store import FilterTooDeep, InvalidFilter

DIM = 4


async def _fill(v: VecApp, n: int) -> None:
    r = await v.client.post("/v1/vectors/collections", json={"name": "docs", "dimension": DIM})
    assert r.status_code == 201, r.text
    x = structured(n, DIM)
    for start in range(0, n, 1000):
        end = min(n, start + 1000)
        r = await v.client.post(
            "/v1/vectors/docs/upsert",
            json={
                "ids": [f"r{i:05d}" for i in range(start, end)],
                "vectors": x[start:end].tolist(),
                "payloads": [{"n": i} for i in range(start, end)],
            },
        )
        assert r.status_code == 200, r.text


def _err(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    return dict(err)


def _nested(levels: int) -> str:
    return "(" * levels + "n >= 3" + ")" * levels


async def test_export_with_a_bad_filter_is_a_400_before_the_stream(vapp: VecApp) -> None:
    await _fill(vapp, 10)
    for bad in ("n === 3", "n >", "(n > 1"):
        _err(await vapp.client.get("/v1/vectors/docs/export", params={"filter": bad}), 400, "invalid_filter")
    _err(await vapp.client.get("/v1/vectors/docs/export", params={"vectors": "maybe"}), 400, "invalid_parameter")
    r = await vapp.client.get("/v1/vectors/docs/export", params={"filter": "n >= 7", "vectors": "false"})
    assert r.status_code == 200, r.text
    rows = [orjson.loads(line) for line in r.content.splitlines()]
    assert sorted(row["payload"]["n"] for row in rows) == [7, 8, 9] and all("vector" not in row for row in rows)


async def test_deep_filters_are_400_filter_too_deep_on_every_route(vapp: VecApp) -> None:
    await _fill(vapp, 10)
    c = vapp.client
    for deep in (_nested(MAX_DEPTH + 1), _nested(200), "n in " + "[" * 300 + "1" + "]" * 300):
        _err(
            await c.post("/v1/vectors/docs/search", json={"vector": [1.0] * DIM, "filter": deep}),
            400,
            "filter_too_deep",
        )
        _err(await c.post("/v1/vectors/docs/delete", json={"filter": deep}), 400, "filter_too_deep")
        _err(await c.get("/v1/vectors/docs/export", params={"filter": deep}), 400, "filter_too_deep")
    ok = _nested(MAX_DEPTH)  # the limit itself works on both engines
    r = await c.post("/v1/vectors/docs/search", json={"vector": [1.0] * DIM, "top_k": 10, "filter": ok})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 7
    r = await c.get("/v1/vectors/docs/export", params={"filter": ok})
    assert r.status_code == 200 and len(r.content.splitlines()) == 7
    r = await c.post("/v1/vectors/docs/delete", json={"filter": ok})
    assert r.status_code == 200, r.text
    assert (await c.get("/v1/vectors/collections/docs")).json()["count"] == 3


def test_check_filter_scans_outside_string_literals() -> None:
    assert check_filter('s == "' + "(" * 100 + "\" and t == '[[[\\''") is not None
    assert check_filter("") is None and check_filter(None) is None
    with pytest.raises(FilterTooDeep) as info:
        check_filter('s == "x\\"" and ' + _nested(MAX_DEPTH + 1))
    assert info.value.status == 400 and info.value.code == "filter_too_deep"
    with pytest.raises(InvalidFilter, match="must be a string"):
        check_filter(5)


async def test_export_failing_mid_stream_ends_with_an_error_line_and_audits_a_failure(vapp: VecApp) -> None:
    """The collection is dropped while the client reads the first batch: the next batch fails."""
    await _fill(vapp, 1500)  # two batches of 1000
    audits: list[tuple[str, str, str, dict[str, Any]]] = []

    async def audit(request: Request, action: str, resource: str, outcome: str, detail: Any) -> None:
        audits.append((action, resource, outcome, detail))

    app = vapp.app
    dropped = False

    async def client_side(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        scope["xc.audit"] = audit

        async def slow_reader(message: Any) -> None:
            nonlocal dropped
            await send(message)
            if message["type"] == "http.response.body" and message.get("body") and not dropped:
                dropped = True
                await vapp.store.drop_collection("docs")

        await app(scope, receive, slow_reader)

    transport = httpx.ASGITransport(app=client_side)
    async with httpx.AsyncClient(transport=transport, base_url="http://xc", timeout=30) as c:
        r = await c.get("/v1/vectors/docs/export", params={"vectors": "false"})
        assert r.status_code == 200  # the head went out with the first batch
        lines = [orjson.loads(line) for line in r.content.splitlines()]
        assert len(lines) == 1001 and all("id" in row for row in lines[:1000])
        assert lines[-1]["error"]["code"] == "collection_not_found", lines[-1]
        assert {"type", "message"} <= set(lines[-1]["error"])
        assert audits[-1][:3] == ("vector.export", "collection:docs", "failure")
        assert audits[-1][3]["rows"] == 1000
        # and a whole export is audited as such
        await _fill(vapp, 3)
        r = await c.get("/v1/vectors/docs/export")
        assert r.status_code == 200 and len(r.content.splitlines()) == 3
        assert audits[-1] == ("vector.export", "collection:docs", "ok", {"rows": 3, "filter": False})
