"""The /v1/vectors HTTP API against both real engines (Milvus Lite, PostgreSQL + pgvector)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson

from tests.vector.conftest import VecApp, structured, vector_settings

DIM = 16


async def _create(v: VecApp, name: str = "docs", dim: int = DIM, metric: str = "cosine") -> dict[str, Any]:
    r = await v.client.post("/v1/vectors/collections", json={"name": name, "dimension": dim, "metric": metric})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _fill(v: VecApp, name: str = "docs", n: int = 60) -> np.ndarray[Any, Any]:
    x = structured(n, DIM, seed=1)
    payloads = [{"cat": "a" if i % 2 else "b", "n": i, "title": f"doc {i}"} for i in range(n)]
    r = await v.client.post(
        f"/v1/vectors/{name}/upsert",
        json={"ids": [f"r{i}" for i in range(n)], "vectors": x.tolist(), "payloads": payloads},
    )
    assert r.status_code == 200, r.text
    assert r.json()["upserted"] == n
    return x


def _err(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"]
    return dict(err)


async def test_collection_lifecycle(vapp: VecApp) -> None:
    info = await _create(vapp, "docs", metric="l2")
    assert info["name"] == "docs" and info["dimension"] == DIM and info["metric"] == "l2"
    r = await vapp.client.get("/v1/vectors/collections")
    assert r.json()["data"] == ["docs"]
    await _fill(vapp)
    r = await vapp.client.get("/v1/vectors/collections/docs")
    assert r.status_code == 200
    d = r.json()
    assert d["count"] == 60 and d["dimension"] == DIM and d["metric"] == "l2"
    assert d["index"]["type"] == "HNSW"
    _err(
        await vapp.client.post("/v1/vectors/collections", json={"name": "docs", "dimension": DIM}),
        409,
        "collection_exists",
    )
    r = await vapp.client.delete("/v1/vectors/collections/docs")
    assert r.status_code == 200 and r.json()["dropped"] is True
    assert (await vapp.client.get("/v1/vectors/collections")).json()["data"] == []
    _err(await vapp.client.get("/v1/vectors/collections/docs"), 404, "collection_not_found")
    _err(await vapp.client.delete("/v1/vectors/collections/docs"), 404, "collection_not_found")


async def test_search_finds_itself_and_returns_only_requested_fields(vapp: VecApp) -> None:
    await _create(vapp)
    x = await _fill(vapp)
    r = await vapp.client.post("/v1/vectors/docs/search", json={"vector": x[7].tolist(), "top_k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert len(hits) == 5
    assert hits[0]["id"] == "r7" and abs(hits[0]["score"] - 1.0) < 1e-4
    assert set(hits[0]) == {"id", "score"}  # nothing that was not asked for
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(4))

    r = await vapp.client.post(
        "/v1/vectors/docs/search", json={"vector": x[7].tolist(), "top_k": 3, "output_fields": ["title"]}
    )
    hits = r.json()["data"]
    assert hits[0]["payload"] == {"title": "doc 7"}
    r = await vapp.client.post(
        "/v1/vectors/docs/search",
        json={"vectors": [x[3].tolist(), x[4].tolist()], "top_k": 2, "output_fields": ["*"], "include_vectors": True},
    )
    data = r.json()["data"]
    assert [q[0]["id"] for q in data] == ["r3", "r4"]
    assert data[0][0]["payload"] == {"cat": "a", "n": 3, "title": "doc 3"}
    assert np.allclose(data[0][0]["vector"], x[3], atol=1e-5)


async def test_filtered_search_same_expression_on_both_engines(vapp: VecApp) -> None:
    await _create(vapp)
    x = await _fill(vapp)
    expr = 'cat == "a" and (n < 20 or n in [41, 43]) and not title like "doc 1%"'
    r = await vapp.client.post(
        "/v1/vectors/docs/search",
        json={"vector": x[0].tolist(), "top_k": 50, "filter": expr, "output_fields": ["n", "cat"]},
    )
    assert r.status_code == 200, r.text
    got = sorted(h["payload"]["n"] for h in r.json()["data"])
    want = sorted(i for i in range(60) if i % 2 and (i < 20 or i in (41, 43)) and not f"doc {i}".startswith("doc 1"))
    assert got == want
    r = await vapp.client.post(
        "/v1/vectors/docs/search", json={"vector": x[0].tolist(), "top_k": 5, "filter": 'id in ["r5", "r9"]'}
    )
    assert sorted(h["id"] for h in r.json()["data"]) == ["r5", "r9"]


async def test_upsert_replaces_and_delete(vapp: VecApp) -> None:
    await _create(vapp)
    x = await _fill(vapp)
    r = await vapp.client.post(
        "/v1/vectors/docs/upsert", json={"ids": ["r1"], "vectors": [(-x[1]).tolist()], "payloads": [{"cat": "z"}]}
    )
    assert r.status_code == 200
    r = await vapp.client.post(
        "/v1/vectors/docs/search", json={"vector": (-x[1]).tolist(), "top_k": 1, "output_fields": ["*"]}
    )
    assert r.json()["data"][0]["id"] == "r1" and r.json()["data"][0]["payload"] == {"cat": "z"}
    r = await vapp.client.post("/v1/vectors/docs/delete", json={"ids": ["r1", "r2"]})
    assert r.status_code == 200, r.text
    r = await vapp.client.post("/v1/vectors/docs/delete", json={"filter": "n >= 50"})
    assert r.status_code == 200, r.text
    d = (await vapp.client.get("/v1/vectors/collections/docs")).json()
    assert d["count"] == 60 - 2 - 10  # r1, r2, and n in 50..59
    r = await vapp.client.post("/v1/vectors/docs/search", json={"vector": x[2].tolist(), "top_k": 3})
    assert "r2" not in [h["id"] for h in r.json()["data"]]


async def test_generated_ids_and_export(vapp: VecApp) -> None:
    await _create(vapp)
    x = structured(25, DIM)
    r = await vapp.client.post("/v1/vectors/docs/upsert", json={"vectors": x.tolist()})
    ids = r.json()["ids"]
    assert len(ids) == 25 and len(set(ids)) == 25
    r = await vapp.client.get("/v1/vectors/docs/export")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [orjson.loads(line) for line in r.content.splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(ids)
    assert all(len(row["vector"]) == DIM for row in rows)
    _err(await vapp.client.get("/v1/vectors/nope/export"), 404, "collection_not_found")


async def test_bad_input(vapp: VecApp) -> None:
    c = vapp.client
    await _create(vapp)
    await _fill(vapp, n=10)
    good = [0.1] * DIM
    # wrong dimension: upsert and search
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": [[0.1] * (DIM + 1)]}), 400, "invalid_vector")
    _err(await c.post("/v1/vectors/docs/search", json={"vector": [0.1] * 3}), 400, "invalid_vector")
    # NaN / inf: not valid JSON numbers, and out-of-float32-range values become inf
    r = await c.post(
        "/v1/vectors/docs/upsert",
        content=b'{"vectors": [[NaN' + b", 0.1" * (DIM - 1) + b"]]}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": [[1e39] * DIM]}), 400, "invalid_vector")
    # empty
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": []}), 400, "invalid_vector")
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": [[]]}), 400, "invalid_vector")
    _err(await c.post("/v1/vectors/docs/search", json={"vector": []}), 400, "invalid_vector")
    # not numbers, ragged
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": [["a"] * DIM]}), 400, "invalid_vector")
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": [good, good[:-1]]}), 400, "invalid_vector")
    # unknown collection
    _err(await c.post("/v1/vectors/nope/search", json={"vector": good}), 404, "collection_not_found")
    _err(await c.post("/v1/vectors/nope/upsert", json={"vectors": [good]}), 404, "collection_not_found")
    _err(await c.post("/v1/vectors/nope/delete", json={"ids": ["a"]}), 404, "collection_not_found")
    # oversize batch
    big = vapp.settings.vector.max_batch + 1
    _err(await c.post("/v1/vectors/docs/upsert", json={"vectors": [good] * big}), 413, "batch_too_large")
    _err(await c.post("/v1/vectors/docs/search", json={"vectors": [good] * big}), 413, "batch_too_large")
    # bad filter: 400 with the parser's message
    err = _err(
        await c.post("/v1/vectors/docs/search", json={"vector": good, "filter": "cat === 'a'"}), 400, "invalid_filter"
    )
    assert "column" in err["message"] or "==" in err["message"], err
    _err(await c.post("/v1/vectors/docs/delete", json={"filter": "n >"}), 400, "invalid_filter")
    # top_k cap, bad names, unknown fields, ids
    _err(await c.post("/v1/vectors/docs/search", json={"vector": good, "top_k": 10_000}), 400, "top_k_too_large")
    _err(await c.post("/v1/vectors/docs/search", json={"vector": good, "top_k": 0}), 400, "invalid_parameter")
    _err(
        await c.post("/v1/vectors/collections", json={"name": "bad name;", "dimension": 4}),
        400,
        "invalid_collection_name",
    )
    _err(await c.post("/v1/vectors/collections", json={"name": "x", "dimension": 0}), 400, "invalid_vector")
    _err(
        await c.post("/v1/vectors/collections", json={"name": "x", "dimension": 4, "metric": "hamming"}),
        400,
        "invalid_parameter",
    )
    _err(await c.post("/v1/vectors/docs/search", json={"vector": good, "bogus": 1}), 400, "invalid_parameter")
    _err(
        await c.post("/v1/vectors/docs/upsert", json={"ids": ["a", "a"], "vectors": [good, good]}), 400, "duplicate_id"
    )
    _err(
        await c.post("/v1/vectors/docs/upsert", json={"vectors": [good], "payloads": [{"id": 1}]}),
        400,
        "invalid_parameter",
    )
    _err(
        await c.post("/v1/vectors/docs/search", json={"vector": good, "output_fields": ["a b"]}),
        400,
        "invalid_parameter",
    )
    r = await c.post("/v1/vectors/docs/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


async def test_text_input_without_and_with_embedder(vapp: VecApp) -> None:
    await _create(vapp, dim=4)
    r = await vapp.client.post("/v1/vectors/docs/upsert", json={"texts": ["hello"]})
    _err(r, 400, "embedding_unavailable")
    _err(await vapp.client.post("/v1/vectors/docs/search", json={"text": "hello"}), 400, "embedding_unavailable")

    calls: list[tuple[str | None, list[str], str | None]] = []

    async def embed(model: str | None, inputs: list[str],
                    input_type: str | None) -> tuple[list[list[float]], dict[str, int]]:
        calls.append((model, inputs, input_type))
        return [[float(len(t)), 1.0, 0.0, 0.5] for t in inputs], {"prompt_tokens": len(inputs)}

    class Local:  # the inference capability's side of `Services.local_embedder`, as a double
        async def embed(self, model: str | None, inputs: list[str],
                        input_type: str | None = None) -> tuple[Any, dict[str, int]]:
            return await embed(model, inputs, input_type)

        async def embeddings_body(self, body: dict[str, Any]) -> dict[str, Any]:
            raise AssertionError("not used by the vector capability")

        def model_names(self) -> list[str]:
            return ["m1"]

    vapp.app.state.xc.services.local_embedder = Local()
    r = await vapp.client.post(
        "/v1/vectors/docs/upsert", json={"ids": ["s", "l"], "texts": ["a", "a much longer text"], "model": "m1"}
    )
    assert r.status_code == 200, r.text
    r = await vapp.client.post("/v1/vectors/docs/search", json={"text": "bb", "top_k": 1})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "s"
    # stored texts are embedded as documents, search texts as queries (e5: `passage: ` / `query: `)
    assert calls == [("m1", ["a", "a much longer text"], "document"), (None, ["bb"], "query")]
    # an embedder whose dimension differs from the collection's: clear 400
    await _create(vapp, name="wide", dim=8)
    _err(await vapp.client.post("/v1/vectors/wide/search", json={"text": "x"}), 400, "invalid_vector")


async def test_scores_are_uniform_across_metrics(vapp: VecApp) -> None:
    a = np.array([1.0, 2.0, 0.0, 0.0] + [0.0] * 4, dtype=np.float32)
    b = np.array([2.0, 0.0, 1.0, 0.0] + [0.0] * 4, dtype=np.float32)
    for metric in ("cosine", "l2", "ip"):
        await _create(vapp, name=f"m_{metric}", dim=8, metric=metric)
        r = await vapp.client.post(f"/v1/vectors/m_{metric}/upsert", json={"ids": ["b"], "vectors": [b.tolist()]})
        assert r.status_code == 200
        r = await vapp.client.post(f"/v1/vectors/m_{metric}/search", json={"vector": a.tolist(), "top_k": 1})
        score = r.json()["data"][0]["score"]
        want = {
            "cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
            "l2": float(np.linalg.norm(a - b)),
            "ip": float(a @ b),
        }[metric]
        assert abs(score - want) < 1e-4, (metric, score, want)


async def test_readyz_and_metrics(vapp: VecApp) -> None:
    r = await vapp.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["vector"]["ready"] is True
    await _create(vapp)
    await _fill(vapp, n=5)
    text = (await vapp.client.get("/metrics")).text
    assert "xc_vector_op_seconds" in text and "xc_vector_backend_up" in text and "xc_vector_rows_total" in text


async def test_explicit_index_build_and_readiness(vapp: VecApp) -> None:
    await _create(vapp)
    x = await _fill(vapp, n=300)
    r = await vapp.client.post("/v1/vectors/collections/docs/index")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["index"]["state"] == "ready" and info["count"] == 300
    if vapp.store.backend == "milvus":
        assert info["index"]["indexed_rows"] == 300 and info["index"]["load_state"].endswith("Loaded")
    r = await vapp.client.post("/v1/vectors/docs/search", json={"vector": x[5].tolist(), "top_k": 1})
    assert r.json()["data"][0]["id"] == "r5"
    _err(await vapp.client.post("/v1/vectors/collections/nope/index"), 404, "collection_not_found")
    # a build in progress shows in /readyz (Milvus: not ready, its collection cannot be searched yet)
    target = vapp.store._loading if vapp.store.backend == "milvus" else vapp.store._building
    target["docs"] = time.monotonic() - 12
    try:
        r = await vapp.client.get("/readyz")
        check = r.json()["checks"]["vector"]
        assert "docs (12s)" in check["detail"], check
        assert check["ready"] is (vapp.store.backend != "milvus")
    finally:
        target.pop("docs")
    assert (await vapp.client.get("/readyz")).status_code == 200


async def test_pgvector_bulk_load_then_create_index(dev_pg: Any, data_dir: Any, open_app: Any) -> None:
    settings = vector_settings("pgvector", data_dir, dev_pg, pgvector={"index_on_create": False})
    async for v in open_app(settings):
        info = await _create(v)
        assert info["index"]["state"] == "none"
        x = await _fill(v, n=200)
        r = await v.client.post("/v1/vectors/docs/search", json={"vector": x[9].tolist(), "top_k": 1})
        assert r.json()["data"][0]["id"] == "r9"  # exact scan before the index exists
        r = await v.client.post("/v1/vectors/collections/docs/index")
        assert r.status_code == 200 and r.json()["index"]["state"] == "ready", r.text
        r = await v.client.post("/v1/vectors/docs/search", json={"vector": x[9].tolist(), "top_k": 1})
        assert r.json()["data"][0]["id"] == "r9"


async def test_milvus_collections_load_at_start(data_dir: Any, open_app: Any) -> None:
    """Milvus Lite opens indexed collections released: xcstack loads them at start (readiness waits);
    with load_on_start off a search says 503 (not loaded) until the explicit index/load call."""
    x = structured(200, DIM, seed=4)
    async for v in open_app(vector_settings("milvus", data_dir)):
        await _create(v)
        r = await v.client.post(
            "/v1/vectors/docs/upsert", json={"ids": [f"r{i}" for i in range(200)], "vectors": x.tolist()}
        )
        assert r.status_code == 200
        r = await v.client.post("/v1/vectors/collections/docs/index")
        assert r.status_code == 200, r.text
    async for v in open_app(vector_settings("milvus", data_dir)):
        for _ in range(100):
            if (await v.client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        r = await v.client.post("/v1/vectors/docs/search", json={"vector": x[17].tolist(), "top_k": 1})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "r17", r.text
    async for v in open_app(vector_settings("milvus", data_dir, milvus={"load_on_start": False})):
        r = await v.client.post("/v1/vectors/docs/search", json={"vector": x[17].tolist(), "top_k": 1})
        _err(r, 503, "vector_backend_unavailable")
        assert "not loaded" in r.json()["error"]["message"]
        assert (await v.client.get("/v1/vectors/collections/docs")).json()["index"]["state"] == "not_loaded"
        assert (await v.client.post("/v1/vectors/collections/docs/index")).status_code == 200
        r = await v.client.post("/v1/vectors/docs/search", json={"vector": x[17].tolist(), "top_k": 1})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "r17"
