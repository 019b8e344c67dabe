"""A generic (non-text) ONNX model through the repository: tensor requests from many clients are batched
by signature and split back, gzip bodies, FP32 NaN rejected over HTTP, JSON output for FP32."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.inference.conftest import inference_settings, make_scale_model
from xcstack.app import create_app


@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    make_scale_model(tmp_path / "models")
    settings = inference_settings(tmp_path, tmp_path / "models", mode="inline")
    app = create_app(settings, ["xcstack.inference.capability"])
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield app, c


def body_for(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]})
    return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head))}


async def test_concurrent_tensor_requests_are_batched_and_split(app_client: Any) -> None:
    app, c = app_client
    xs = [np.full((1 + i % 3, 4), float(i), np.float32) for i in range(24)]

    async def one(x: np.ndarray) -> np.ndarray:
        body, headers = body_for(x)
        r = await c.post("/v2/models/scale/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        return np.array(out["data"], np.float32).reshape(out["shape"])

    outs = await asyncio.gather(*(one(x) for x in xs))
    for x, y in zip(xs, outs, strict=True):
        assert np.array_equal(y, x * 2)
    batcher = app.state.xc.capabilities[0].backend.core.models["scale"].batcher
    assert batcher.batches_run < len(xs)  # requests shared runs


async def test_gzip_body_and_nan_rejected(app_client: Any) -> None:
    _app, c = app_client
    body, headers = body_for(np.ones((2, 3), np.float32))
    r = await c.post("/v2/models/scale/infer", content=gzip.compress(body),
                     headers={**headers, "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    bad, headers = body_for(np.array([[1.0, np.inf]], np.float32))
    r = await c.post("/v2/models/scale/infer", content=bad, headers=headers)
    assert r.status_code == 400
    assert r.json()["code"] == "non_finite_value" and r.json()["param"] == "x"
    r = await c.post("/v2/models/scale/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_encoding"
