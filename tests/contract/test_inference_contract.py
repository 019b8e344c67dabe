"""The inference routes answer what their OpenAPI contract says: every KServe v2 operation and the local
/v1/embeddings are documented, real answers (successes, KServe-shaped errors, the binary extension's JSON
header) validate against the documented schemas, and a request the documented schema refuses is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

import orjson
import pytest
from starlette.testclient import TestClient

from tests.contract.schema import Contract
from tests.inference.conftest import default_model_repo, inference_settings, make_scale_model
from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.inference.protocol import Datatype
from xcstack.inference.tensors import DTYPES

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Contract]]:
    model_repo = default_model_repo(tmp_path_factory)  # the session's cached import, shared with tests/inference
    repo = tmp_path_factory.mktemp("repo")
    for name in (MODEL, MODEL + "-int8"):  # the int8 copy is the default embedding model
        (repo / name).symlink_to(model_repo / name, target_is_directory=True)
    make_scale_model(repo, "scale")
    (repo / "broken").mkdir()  # listed as UNAVAILABLE with its reason
    (repo / "broken" / "config.json").write_text("{")
    settings = inference_settings(tmp_path_factory.mktemp("data"), repo, mode="inline", max_inputs=8)
    app = create_app(settings, ["xcstack.inference.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/openapi.json")
        assert r.status_code == 200
        yield c, Contract(r.json())


def test_every_inference_operation_is_documented(served: tuple[TestClient, Contract]) -> None:
    _, contract = served
    ops = {(m, p): op for p, item in contract.doc["paths"].items() for m, op in item.items()
           if p.startswith("/v2") or p == "/v1/embeddings"}
    assert len(ops) == 13
    assert [k for k, op in ops.items() if op.get("x-xc-undocumented")] == []
    assert all("200" in op["responses"] for op in ops.values())
    kserve = {k for k, op in ops.items() if op["responses"]["default"]["$ref"].endswith("/KServeError")}
    assert ("post", "/v2/models/{name}/infer") in kserve and ("get", "/v2/repository/index") in kserve
    infer = ops[("post", "/v2/models/{name}/infer")]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert "Inference-Header-Content-Length" in infer["requestBody"]["content"]["application/octet-stream"][
        "schema"]["description"]
    assert set(get_args(Datatype)) == set(DTYPES)  # the documented datatypes are the decoder's


def test_kserve_metadata_health_and_index_answers_match(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    assert contract.check(c.get("/v2"), "get", "/v2")["extensions"] == ["binary_tensor_data"]
    contract.check(c.get("/v2/health/live"), "get", "/v2/health/live")
    contract.check(c.get("/v2/health/ready"), "get", "/v2/health/ready")
    md = contract.check(c.get(f"/v2/models/{MODEL}"), "get", "/v2/models/{name}")
    assert md["parameters"] == {"text_input": "text"}  # the optional member, present for a text model
    assert "parameters" not in contract.check(c.get("/v2/models/scale"), "get", "/v2/models/{name}")
    contract.check(c.get(f"/v2/models/{MODEL}/versions/1"), "get", "/v2/models/{name}/versions/{version}")
    cfg = contract.check(c.get(f"/v2/models/{MODEL}/config"), "get", "/v2/models/{name}/config")
    assert cfg["inputs"][0]["value_range"] == [0.0, 30521.0]
    contract.check(c.get("/v2/models/scale/ready"), "get", "/v2/models/{name}/ready")
    r = c.get("/v2/models/broken/ready")  # a model whose config is invalid: 503, KServe error
    assert r.status_code == 503 and contract.check(r, "get", "/v2/models/{name}/ready")["code"] == "model_unavailable"
    r = c.get("/v2/models/nope")
    assert r.status_code == 404 and contract.check(r, "get", "/v2/models/{name}")["code"] == "model_not_found"
    index = contract.check(c.get("/v2/repository/index"), "get", "/v2/repository/index")
    assert {m["name"]: m["state"] for m in index} == {MODEL: "READY", MODEL + "-int8": "READY", "broken": "UNAVAILABLE",
                                                       "scale": "READY"}
    r = c.post("/v2/repository/index")  # the body is optional
    assert contract.check(r, "post", "/v2/repository/index") == index


def test_repository_index_ready_filter(served: tuple[TestClient, Contract]) -> None:
    """KServe's `{"ready": true}` lists only the ready models; a body that is not the documented one is a 400."""
    c, contract = served
    r = c.post("/v2/repository/index", json={"ready": True})
    ready = sorted(m["name"] for m in contract.check(r, "post", "/v2/repository/index"))
    assert ready == [MODEL, MODEL + "-int8", "scale"]
    r = c.post("/v2/repository/index", json={"ready": False})
    assert len(contract.check(r, "post", "/v2/repository/index")) == 4
    schema = contract.request_schema("post", "/v2/repository/index")
    for bad in ({"ready": "true"}, {"ready": 1}, [True]):
        assert contract.errors(bad, schema)  # the documented schema refuses it ...
        r = c.post("/v2/repository/index", json=bad)
        assert r.status_code == 400, (bad, r.text)  # ... and so does the endpoint, in the KServe shape
        assert contract.check(r, "post", "/v2/repository/index")["code"] == "invalid_parameter"
    r = c.post("/v2/repository/index", content=b"{nope")
    assert r.status_code == 400 and contract.check(r, "post", "/v2/repository/index")["code"] == "invalid_json"


def test_infer_json_and_binary_answers_match(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    path = "/v2/models/{name}/infer"
    body = {"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3.5, -4]]}]}
    assert not contract.errors(body, contract.request_schema("post", path))
    out = contract.check(c.post("/v2/models/scale/infer", json=body), "post", path)
    assert out["id"] == "r1" and out["outputs"][0]["data"] == [2, 4, 7, -8]
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}],
            "parameters": {"binary_data_output": False}}
    out = contract.check(c.post(f"/v2/models/{MODEL}/infer", json=text), "post", path)
    assert "id" not in out and out["outputs"][0]["shape"] == [1, 384]
    # binary extension: the JSON header of the answer has the documented JSON form
    head = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                     "parameters": {"binary_data_size": 8}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    raw = head + b"\x00\x00\x80?\x00\x00\x00@"  # 1.0, 2.0 as float32
    r = c.post("/v2/models/scale/infer", content=raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert "application/octet-stream" in contract.doc["paths"][path]["post"]["responses"]["200"]["content"]
    hlen = int(r.headers["inference-header-content-length"])
    header = orjson.loads(r.content[:hlen])
    assert not contract.errors(header, contract.response_schema("post", path, 200))
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8} and len(r.content) == hlen + 8


def test_infer_errors_are_kserve_shaped(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    path = "/v2/models/{name}/infer"
    r = c.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and contract.check(r, "post", path)["code"] == "model_not_found"
    r = c.post("/v2/models/scale/infer", json={"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 1],
                                                           "data": [1]}]})
    assert r.status_code == 400 and contract.check(r, "post", path)["param"] == "x"


@pytest.mark.parametrize("body", [
    {"inputs": []},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}], "parameters": [1]},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}], "parameters": "yes"},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1], "parameters": [8]}]},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}], "outputs": [
        {"name": "y", "parameters": True}]},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
     "parameters": {"binary_data_output": "false"}},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}], "id": 7},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 0], "data": []}]},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": None}]},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "parameters": {"binary_data_size": True}}]},
])
def test_infer_refuses_what_its_schema_refuses(served: tuple[TestClient, Contract], body: dict[str, Any]) -> None:
    """A fuzzer's schema-invalid request gets a 4xx: `parameters` that are not an object were once ignored."""
    c, contract = served
    path = "/v2/models/{name}/infer"
    assert contract.errors(body, contract.request_schema("post", path))
    r = c.post("/v2/models/scale/infer", json=body)
    assert r.status_code == 400, r.text
    contract.check(r, "post", path)


def test_infer_accepts_null_members_its_schema_allows(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    path = "/v2/models/{name}/infer"
    body = {"id": None, "outputs": None, "parameters": None,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1], "parameters": None}]}
    assert not contract.errors(body, contract.request_schema("post", path))
    contract.check(c.post("/v2/models/scale/infer", json=body), "post", path)


def test_embeddings_answers_match(served: tuple[TestClient, Contract]) -> None:
    c, contract = served
    path = "/v1/embeddings"
    out = contract.check(c.post(path, json={"input": ["a", "b"], "model": MODEL}), "post", path)
    assert [d["index"] for d in out["data"]] == [0, 1] and len(out["data"][0]["embedding"]) == 384
    body = {"input": "a", "encoding_format": "base64", "model": MODEL + "-int8"}
    out = contract.check(c.post(path, json=body), "post", path)
    assert isinstance(out["data"][0]["embedding"], str) and out["model"] == MODEL + "-int8"
    r = c.post(path, json={"input": "a", "model": "nope"})
    assert r.status_code == 404 and contract.check(r, "post", path)["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    {"input": "a", "dimensions": "384"},  # once coerced to 384 (and answered 200)
    {"input": "a", "dimensions": 384.0},
    {"input": "a", "model": 5},
    {"input": [True]},
])
def test_embeddings_do_not_coerce_json_types(served: tuple[TestClient, Contract], body: dict[str, Any]) -> None:
    c, contract = served
    r = c.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert contract.check(r, "post", "/v1/embeddings")["error"]["code"] in ("invalid_parameter", "unsupported_input")


def test_a_wrong_documented_field_is_caught(served: tuple[TestClient, Contract]) -> None:
    """The checks above are not vacuous: the schemas refuse a body with a field of the wrong type or missing."""
    c, contract = served
    schema = contract.response_schema("post", "/v2/models/{name}/infer", 200)
    body = c.post("/v2/models/scale/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1],
                                                              "data": [1]}]}).json()
    assert not contract.errors(body, schema)
    assert contract.errors({**body, "model_version": 1}, schema)
    assert contract.errors({k: v for k, v in body.items() if k != "outputs"}, schema)
    emb = c.post("/v1/embeddings", json={"input": "a"}).json()
    assert contract.errors({**emb, "usage": {"prompt_tokens": 1.5, "total_tokens": 2}},
                           contract.response_schema("post", "/v1/embeddings", 200))


def test_errors_answered_before_the_route_match_the_kserve_operations(
        served: tuple[TestClient, Contract], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Authentication, RBAC and the server's body limit answer before a /v2 route runs, in xcstack's error
    shape: the KServe operations document that shape too for those statuses."""
    c, contract = served
    path = "/v2/models/{name}/infer"
    r = c.post("/v2/models/scale/infer", content=b"x" * (8 * 1024 * 1024 + 1))  # [server] max_body_bytes
    assert r.status_code == 413 and "code" in r.json()["error"]
    contract.check(r, "post", path)
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("secure"),
                             security={"pbkdf2_iterations": 100_000})
    with TestClient(create_app(settings, ["xcstack.security.capability", "xcstack.inference.capability"]),
                    raise_server_exceptions=False) as secure:
        doc = Contract(secure.get("/openapi.json").json())
        r = secure.post("/v2/models/scale/infer", json={"inputs": []})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        doc.check(r, "post", path)
        r = secure.get("/v2/repository/index", headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401
        doc.check(r, "get", "/v2/repository/index")
