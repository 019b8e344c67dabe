"""HTTP surface in inline mode: /v1/embeddings, KServe v2 metadata/health/infer (JSON and binary), and
every bad-input path as a 4xx JSON error with a stable code naming the tensor."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from tests.inference.conftest import inference_settings
from xcstack.app import create_app

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("inline")
    settings = inference_settings(data, model_repo, mode="inline", max_tensor_bytes=200_000, max_inputs=8)
    with TestClient(create_app(settings, ["xcstack.inference.capability"]), raise_server_exceptions=False) as c:
        yield c


def err(resp: Any, status: int, code: str) -> dict[str, Any]:
    """OpenAI routes: {"error": {type, code, message}}; KServe routes: {"error": message, code, type, param}."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    if isinstance(body["error"], str):
        e = {"message": body["error"], **{k: v for k, v in body.items() if k != "error"}}
    else:
        e = body["error"]
    assert e["code"] == code, e
    return e  # type: ignore[no-any-return]


def binary_body(inputs: list[tuple[str, str, list[int], bytes]], outputs: Any = None) -> tuple[bytes, dict[str, str]]:
    head: dict[str, Any] = {
        "inputs": [{"name": n, "datatype": dt, "shape": s, "parameters": {"binary_data_size": len(b)}}
                   for n, dt, s, b in inputs]
    }
    if outputs is not None:
        head["outputs"] = outputs
    h = orjson.dumps(head)
    return h + b"".join(b for *_, b in inputs), {"Inference-Header-Content-Length": str(len(h))}


def ids_input(ids: np.ndarray, name: str = "input_ids", dt: str = "INT64") -> tuple[str, str, list[int], bytes]:
    return (name, dt, list(ids.shape), ids.astype("<i8").tobytes())


# --- OpenAI embeddings --------------------------------------------------------------------------
def test_embeddings_string_and_list_with_usage(client: TestClient, reference: tuple[list[str], np.ndarray]) -> None:
    sentences, ref = reference
    r = client.post("/v1/embeddings", json={"input": sentences[6], "model": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    v = np.array(body["data"][0]["embedding"], dtype=np.float32)
    assert v.shape == (384,) and float(v @ ref[6]) / np.linalg.norm(ref[6]) > 0.9999
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3
    r = client.post("/v1/embeddings", json={"input": sentences[:3]})  # default model
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]


def test_embeddings_base64(client: TestClient) -> None:
    a = client.post("/v1/embeddings", json={"input": ["hello"], "encoding_format": "float"}).json()
    b = client.post("/v1/embeddings", json={"input": ["hello"], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, a["data"][0]["embedding"], atol=1e-6)


def test_embeddings_int8_model(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": "hello", "model": MODEL + "-int8"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"input": []}, 400, "invalid_parameter"),
        ({"input": ["x"] * 9}, 400, "too_many_inputs"),
        ({"input": [[1, 2, 3]]}, 400, "unsupported_input"),
        ({"input": "x" * 100_001}, 400, "input_too_long"),
        ({"input": "x", "model": "nope"}, 404, "model_not_found"),
        ({"input": "x", "dimensions": 128}, 400, "invalid_parameter"),
        ({"input": "x", "encoding_format": "hex"}, 400, "invalid_parameter"),
        ({"model": MODEL}, 400, "invalid_parameter"),
    ],
)
def test_embeddings_bad_input(client: TestClient, payload: dict[str, Any], status: int, code: str) -> None:
    err(client.post("/v1/embeddings", json=payload), status, code)


# --- KServe v2 ------------------------------------------------------------------------------------
def test_health_and_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    md = client.get(f"/v2/models/{MODEL}").json()
    assert md["name"] == MODEL and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    assert md["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, 384]}]
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    err(client.get("/v2/models/nope"), 404, "model_not_found")
    err(client.get(f"/v2/models/{MODEL}/versions/7"), 404, "model_not_found")


def test_infer_json_data(client: TestClient) -> None:
    body = {"id": "r1", "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [101, 7592, 2088, 102]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 4], "data": [[1, 1, 1, 1]]},
    ]}
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["model_name"] == MODEL
    o = out["outputs"][0]
    assert o["name"] == "embeddings" and o["shape"] == [1, 384] and len(o["data"]) == 384
    assert abs(np.linalg.norm(o["data"]) - 1) < 1e-4


def test_infer_binary_roundtrip_and_zero_copy(client: TestClient) -> None:
    ids = np.array([[101, 7592, 2088, 102], [101, 2088, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    body, headers = binary_body([ids_input(ids), ids_input(mask, "attention_mask")],
                                outputs=[{"name": "embeddings", "parameters": {"binary_data": True}}])
    r = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    hlen = int(r.headers["inference-header-content-length"])
    head = orjson.loads(r.content[:hlen])
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    emb = np.frombuffer(r.content[hlen:hlen + size], dtype="<f4").reshape(head["outputs"][0]["shape"])
    assert emb.shape == (2, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_decoder_does_not_copy() -> None:
    from xcstack.inference.kserve import decode_infer_request
    from xcstack.inference.repository import ModelConfig

    cfg = ModelConfig.model_validate({"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                                      "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]})
    data = np.arange(8, dtype="<f4").reshape(2, 4)
    body, headers = binary_body([("x", "FP32", [2, 4], data.tobytes())])
    req = decode_infer_request(body, headers["Inference-Header-Content-Length"], cfg)
    x = req.inputs["x"]
    assert np.array_equal(x, data)
    assert not x.flags.owndata and not x.flags.writeable  # a view over the request body


def test_bytes_tensor_codec() -> None:
    from xcstack.inference.tensors import decode_bytes_tensor, encode_bytes_tensor

    arr = np.array([b"abc", "中文".encode(), b""], dtype=object)
    raw = encode_bytes_tensor(arr)
    assert raw[:4] == struct.pack("<I", 3)
    assert list(decode_bytes_tensor(memoryview(raw), 3, "t")) == list(arr)
    for broken in (raw + b"x", raw[:-3], raw[:2]):
        with pytest.raises(Exception, match="'t'"):
            decode_bytes_tensor(memoryview(broken), 3, "t")


GOOD_IDS = np.array([[101, 7592, 102]], dtype=np.int64)
GOOD_MASK = np.ones((1, 3), dtype=np.int64)


@pytest.mark.parametrize(
    ("inputs", "code", "tensor"),
    [
        # wrong dtype
        ([("input_ids", "INT32", [1, 3], GOOD_IDS.astype("<i4").tobytes()), ids_input(GOOD_MASK, "attention_mask")],
         "invalid_datatype", "input_ids"),
        # wrong rank
        ([("input_ids", "INT64", [3], GOOD_IDS.tobytes()), ids_input(GOOD_MASK, "attention_mask")],
         "invalid_shape", "input_ids"),
        # byte size does not match the shape
        ([("input_ids", "INT64", [1, 4], GOOD_IDS.tobytes()), ids_input(GOOD_MASK, "attention_mask")],
         "invalid_tensor_size", "input_ids"),
        # too many inputs
        ([ids_input(GOOD_IDS), ids_input(GOOD_MASK, "attention_mask"), ids_input(GOOD_MASK, "token_type_ids")],
         "too_many_inputs", None),
        # unknown input name
        ([ids_input(GOOD_IDS), ids_input(GOOD_MASK, "mask")], "unknown_input", "mask"),
        # missing input
        ([ids_input(GOOD_IDS)], "missing_input", "attention_mask"),
        # ids outside the vocabulary: rejected before batching (would fail the whole batch)
        ([ids_input(np.array([[101, 999999, 102]])), ids_input(GOOD_MASK, "attention_mask")],
         "value_out_of_range", "input_ids"),
        # sequence longer than the model's positions
        ([ids_input(np.ones((1, 600), np.int64)), ids_input(np.ones((1, 600), np.int64), "attention_mask")],
         "invalid_shape", "input_ids"),
        # batch over max_batch_size
        ([ids_input(np.ones((33, 3), np.int64)), ids_input(np.ones((33, 3), np.int64), "attention_mask")],
         "batch_too_large", "input_ids"),
    ],
)
def test_infer_bad_tensors_are_400_naming_the_tensor(
    client: TestClient, inputs: list[Any], code: str, tensor: str | None
) -> None:
    body, headers = binary_body(inputs)
    e = err(client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers), 400, code)
    if tensor:
        assert e.get("param") == tensor and f"'{tensor}'" in e["message"], e


def test_infer_non_finite_is_rejected(tmp_path: Path) -> None:
    from xcstack.errors import BadRequest
    from xcstack.inference.kserve import decode_infer_request
    from xcstack.inference.repository import ModelConfig

    cfg = ModelConfig.model_validate({"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                                      "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]})
    body, headers = binary_body([("x", "FP32", [1, 2], np.array([1.0, np.nan], "<f4").tobytes())])
    with pytest.raises(BadRequest) as info:
        decode_infer_request(body, headers["Inference-Header-Content-Length"], cfg)
    assert info.value.code == "non_finite_value" and info.value.param == "x"


def test_infer_trailing_bytes_header_and_json_errors(client: TestClient) -> None:
    body, headers = binary_body([ids_input(GOOD_IDS), ids_input(GOOD_MASK, "attention_mask")])
    err(client.post(f"/v2/models/{MODEL}/infer", content=body + b"xx", headers=headers), 400, "invalid_tensor_size")
    err(client.post(f"/v2/models/{MODEL}/infer", content=body,
                    headers={"Inference-Header-Content-Length": "99999"}), 400, "invalid_header")
    err(client.post(f"/v2/models/{MODEL}/infer", content=b"{nope"), 400, "invalid_json")
    err(client.post("/v2/models/nope/infer", content=body, headers=headers), 404, "model_not_found")


def test_infer_oversize_body_is_413(client: TestClient) -> None:
    err(client.post(f"/v2/models/{MODEL}/infer", content=b"x" * 200_001), 413, "payload_too_large")


def test_local_embedder_service(client: TestClient) -> None:
    xc = client.app.state.xc  # type: ignore[attr-defined]
    assert xc.services.local_embedder is not None
    fn = xc.services.local_embedder.embed

    async def go() -> tuple[Any, Any]:
        return await fn(None, ["a", "b"])  # type: ignore[no-any-return]

    vecs, usage = client.portal.call(go)  # type: ignore[union-attr]
    assert np.asarray(vecs).shape == (2, 384) and usage["total_tokens"] == usage["prompt_tokens"] > 0


def test_services_for_other_capabilities(client: TestClient) -> None:
    xc = client.app.state.xc  # type: ignore[attr-defined]
    local = xc.services.local_embedder
    assert set(local.model_names()) == {MODEL, MODEL + "-int8", "multilingual-e5-small", "multilingual-e5-small-int8"}
    full = local.embeddings_body

    async def go() -> Any:
        return await full({"input": ["a"], "encoding_format": "base64"})

    out = client.portal.call(go)  # type: ignore[union-attr]
    assert isinstance(out["data"][0]["embedding"], str) and out["usage"]["total_tokens"] > 0


def test_embeddings_route_yields_to_the_gateway(model_repo: Path, tmp_path: Path) -> None:
    from xcstack.app import embeddings_owner
    from xcstack.capability import AppContext
    from xcstack.inference.capability import create

    settings = inference_settings(tmp_path, model_repo, mode="inline")
    assert embeddings_owner(settings, ["xcstack.gateway.capability", "xcstack.inference.capability"]) == "gateway"
    assert embeddings_owner(settings, ["xcstack.inference.capability"]) == "inference"
    ctx = AppContext(settings=settings, state=None, embeddings_owner="gateway")  # type: ignore[arg-type]
    cap = create(ctx)
    assert cap is not None and ctx.services.local_embedder is cap.models
    paths = {getattr(r, "path", "") for r in cap.routes()}
    assert "/v1/embeddings" not in paths and "/v2/models/{name}/infer" in paths


def test_infer_text_input_json_and_bad_utf8(client: TestClient) -> None:
    r = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["你好", "hello"]}]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [2, 384]
    bad = struct.pack("<I", 2) + b"\xff\xfe"
    body, headers = binary_body([("text", "BYTES", [1], bad)])
    e = err(client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers), 400, "invalid_data")
    assert e["param"] == "text"
    # text and token tensors together: too many inputs for the text form
    body, headers = binary_body([("text", "BYTES", [1], struct.pack("<I", 1) + b"a"), ids_input(GOOD_IDS)])
    err(client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers), 400, "too_many_inputs")


def test_local_embedder_chunks_large_inputs(client: TestClient) -> None:
    xc = client.app.state.xc  # type: ignore[attr-defined]
    fn = xc.services.local_embedder.embed
    texts = [f"doc {i}" for i in range(1200)]  # more than one chunk, and more than max_inputs of the API

    async def go() -> Any:
        return await fn(None, texts)

    async def go_fp32() -> Any:
        return await fn(MODEL, texts)

    vecs, usage = client.portal.call(go_fp32)  # type: ignore[union-attr]
    assert np.asarray(vecs).shape == (1200, 384) and usage["total_tokens"] > 1200
    one = client.post("/v1/embeddings", json={"input": "doc 1100", "model": MODEL}).json()["data"][0]["embedding"]
    assert np.allclose(vecs[1100], one, atol=1e-5)  # fp32: the same vector in a batch of 512 and alone
    # the default (int8): dynamic activation scales depend a little on the batch-mates, so the same text
    # alone and in a chunk of 512 agree to a cosine, not bit for bit
    vecs8, _ = client.portal.call(go)  # type: ignore[union-attr]
    r = client.post("/v1/embeddings", json={"input": "doc 1100"}).json()
    assert r["model"] == "multilingual-e5-small-int8"  # the default embedding model
    one8 = np.asarray(r["data"][0]["embedding"], dtype=np.float32)
    assert float(vecs8[1100] @ one8) > 0.985  # measured: mean 0.9985, min 0.992 over 528 texts
