"""`POST /v1/rerank` (alias `/rerank`) through the whole app: a local cross-encoder (inference capability,
inline), an upstream (the mock's vLLM-shaped /v1/rerank, routed and failed over), the bi-encoder fallback,
limits and bad input, the model permission and the audit record."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, make_settings, upstream
from tests.inference.rerank_fixtures import make_checkpoint, pair_batch, reference_logits

INFERENCE_CAP = "xcstack.inference.capability"
QUERY = "what is the capital of france?"
DOCS = ["berlin is a city in germany.", "paris is the capital of france.", "the cat sat on the mat."]


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`full`: a BERT reranker `ce` and a tiny embedding model `emb`; `emb-only`: just `emb`."""
    from xcstack.inference.export import import_model
    from xcstack.inference.export.cross_encoder import import_cross_encoder

    root = tmp_path_factory.mktemp("gw-rerank")
    src = make_checkpoint(root / "bert", "bert", labels=1)
    full = root / "full"
    import_cross_encoder(src, full, "ce")
    emb = root / "emb-src"
    shutil.copytree(src, emb)
    cfg = json.loads((emb / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (emb / "config.json").write_text(json.dumps(cfg))
    import_model(emb, full, "emb")
    only = root / "emb-only"
    only.mkdir()
    shutil.copytree(full / "emb", only / "emb")
    return {"full": full, "emb-only": only, "src": src}


def _server(tmp: Path, repo: Path | None, upstreams: list[dict[str, Any]], security: bool = False,
            **gateway: Any) -> GatewayServer:
    from xcstack.inference.settings import InferenceSettings

    tmp.mkdir(parents=True, exist_ok=True)
    settings = make_settings(tmp, upstreams, **gateway)
    modules = [GATEWAY_CAP]
    if repo is not None:
        settings.inference = InferenceSettings.model_validate(
            {"mode": "inline", "model_repository": str(repo), "default_embedding_model": "emb"})
        modules.append(INFERENCE_CAP)
    else:
        settings.inference = InferenceSettings.model_validate({"enabled": False})
    if security:
        from xcstack.security.settings import SecuritySettings

        settings.security = SecuritySettings.model_validate({"pbkdf2_iterations": 100_000})
        modules.insert(0, "xcstack.security.capability")
    return GatewayServer(settings, modules).start()


@pytest.fixture
def gw(tmp_path: Path, repos: dict[str, Path], mock: MockUpstream) -> Iterator[GatewayServer]:
    srv = _server(tmp_path, repos["full"], [upstream(mock, models=["mock-rerank"])], rerank={"max_documents": 5,
                  "max_document_chars": 200, "max_query_chars": 50})
    yield srv
    srv.stop()


def _post(gw: GatewayServer, body: Any, path: str = "/v1/rerank", **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=30, **kw)


def test_local_cross_encoder(gw: GatewayServer, repos: dict[str, Path]) -> None:
    docs: list[Any] = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    r = _post(gw, {"model": "ce", "query": QUERY, "documents": docs})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "ce" and out["method"] == "cross-encoder" and out["id"].startswith("rerank-")
    ids, mask, types = pair_batch(repos["src"] / "tokenizer.json", [(QUERY, d) for d in DOCS], 0)
    expected = 1 / (1 + np.exp(-reference_logits(repos["src"], ids, mask, types)[:, 0]))
    got = {x["index"]: x["relevance_score"] for x in out["results"]}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=1e-4)
    scores = [x["relevance_score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [x["document"]["text"] for x in out["results"]] == [DOCS[x["index"]] for x in out["results"]]
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] == int(mask.sum())
    # top_n, return_documents: false, the /rerank alias and the default model (the only rerank model)
    r2 = _post(gw, {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}, "/rerank")
    assert r2.status_code == 200, r2.text
    out2 = r2.json()
    assert out2["model"] == "ce" and [x["index"] for x in out2["results"]] == [x["index"] for x in out["results"]][:2]
    assert all("document" not in x for x in out2["results"])


def test_bi_encoder_fallback(gw: GatewayServer, tmp_path: Path, repos: dict[str, Path]) -> None:
    """An embedding model scores by cosine and says so; without any rerank model it is the default."""
    r = _post(gw, {"model": "emb", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["method"] == "bi-encoder" and out["model"] == "emb"
    vec = httpx.post(gw.base_url + "/embeddings", json={"model": "emb", "input": [QUERY, *DOCS]}).json()["data"]
    v = np.array([d["embedding"] for d in vec])
    cos = v[1:] @ v[0]
    got = {x["index"]: x["relevance_score"] for x in out["results"]}
    np.testing.assert_allclose([got[i] for i in range(3)], cos, atol=1e-5)
    other = _server(tmp_path / "only", repos["emb-only"], [])
    try:
        r = _post(other, {"query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        assert r.json()["method"] == "bi-encoder" and r.json()["model"] == "emb"
    finally:
        other.stop()
    bare = _server(tmp_path / "none", None, [])
    try:
        r = _post(bare, {"query": QUERY, "documents": DOCS})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_required", r.text
    finally:
        bare.stop()


def test_upstream_routed_and_failed_over(tmp_path: Path, repos: dict[str, Path], mocks: list[MockUpstream]) -> None:
    for m in mocks:
        m.reset()
    a, b = mocks[0], mocks[1]
    srv = _server(tmp_path, repos["full"], [upstream(a, models=["mock-rerank"]), upstream(b, models=["mock-rerank"])])
    try:
        a.configure(fault="500")
        b.configure(fault="500", fault_times=0)
        # whichever is tried first, the answer comes from b; until a has been tried (and failed over from)
        # at least once: the router's pick is not fixed, and 3 requests all went to b once in CI
        for i in range(30):
            r = _post(srv, {"model": "mock-rerank", "query": "capital of france",
                            "documents": [DOCS[0], {"text": DOCS[1]}], "top_n": 1})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["method"] == "cross-encoder" and out["model"] == "mock-rerank"
            assert [x["index"] for x in out["results"]] == [1] and out["results"][0]["document"]["text"] == DOCS[1]
            assert out["usage"]["total_tokens"] > 0
            if i >= 2 and a.stats()["faults"] >= 1:
                break
        assert b.last()["body"]["documents"] == [DOCS[0], DOCS[1]]  # objects sent as the strings vLLM takes
        assert b.last()["path"] == "/v1/rerank" and a.stats()["faults"] >= 1
        r = _post(srv, {"model": "mock-rerank", "query": "q", "documents": ["a"], "return_documents": False})
        assert r.status_code == 200 and "document" not in r.json()["results"][0], r.text
        b.configure(fault="500", fault_times=-1)
        r = _post(srv, {"model": "mock-rerank", "query": "q", "documents": ["a"]})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
    finally:
        srv.stop()


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": "ghost", "query": "q", "documents": ["a"]}, 404, "model_not_found", "model"),
    ({"model": "ce", "query": "q", "documents": []}, 400, "invalid_parameter", "documents"),
    ({"model": "ce", "query": "", "documents": ["a"]}, 400, "invalid_parameter", "query"),
    ({"model": "ce", "query": "q", "documents": ["a"] * 6}, 400, "too_many_documents", "documents"),
    ({"model": "ce", "query": "q", "documents": ["a", "x" * 201]}, 400, "document_too_long", "documents[1]"),
    ({"model": "ce", "query": "q" * 51, "documents": ["a"]}, 400, "query_too_long", "query"),
    ({"model": "ce", "query": 5, "documents": ["a"]}, 400, "invalid_parameter", "query"),
    ({"model": "ce", "query": "q", "documents": [1]}, 400, "invalid_parameter", None),
    ({"model": "ce", "query": "q", "documents": [{"txt": "a"}]}, 400, "invalid_parameter", None),
    ({"model": "ce", "query": "q", "documents": "a"}, 400, "invalid_parameter", None),
    ({"model": "ce", "query": "q", "documents": ["a"], "top_n": "2"}, 400, "invalid_parameter", "top_n"),
    ({"model": "ce", "query": "q", "documents": ["a"], "top_n": 0}, 400, "invalid_parameter", "top_n"),
    ({"model": "ce", "query": "q", "documents": ["a"], "return_documents": "yes"}, 400, "invalid_parameter",
     "return_documents"),
    ({"model": 7, "query": "q", "documents": ["a"]}, 400, "invalid_parameter", "model"),
    ([1, 2], 400, "invalid_json", None),
])
def test_bad_input(gw: GatewayServer, body: Any, status: int, code: str, param: str | None) -> None:
    r = _post(gw, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param or err["param"].startswith(param), err


def test_permission_and_audit(tmp_path: Path, repos: dict[str, Path], mock: MockUpstream) -> None:
    """`model:<name>` invoke like the other model routes (403 before any 404), and one `api.call` record."""
    from tests.security.conftest import audit_records
    from xcstack.security.service import SYSTEM

    srv = _server(tmp_path, repos["full"], [upstream(mock, models=["mock-rerank"])], security=True)
    try:
        sec = srv.cap("security")

        async def setup() -> None:
            await sec.service.create_role(SYSTEM, "rr", [("route:/v1/*", "*"), ("route:/rerank", "*"),
                                                         ("model:emb", "invoke")])
            await sec.service.create_user(SYSTEM, "rr-app", ["rr"], kind="service", password="Gateway-Pass-2024!")

        srv.call(setup)
        token = httpx.post(srv.url + "/v1/auth/login", json={"username": "rr-app",
                                                              "password": "Gateway-Pass-2024!"}).json()["token"]
        h = {"Authorization": f"Bearer {token}", "X-Request-Id": "rr-1"}
        assert _post(srv, {"model": "emb", "query": "q", "documents": ["a"]}, headers=h).status_code == 200
        for model in ("ce", "mock-rerank", "ghost"):  # local, upstream, unknown: all 403 without the permission
            r = _post(srv, {"model": model, "query": "q", "documents": ["a"]}, headers=h)
            assert r.status_code == 403, (model, r.text)
        r = _post(srv, {"query": "q", "documents": ["a"]}, "/rerank", headers=h)  # the default is `ce`
        assert r.status_code == 403, r.text
        assert _post(srv, {"model": "emb", "query": "q", "documents": ["a"]}).status_code == 401
        srv.call(sec.audit.flush)
        recs = [x for x in audit_records(sec.audit_root) if x.get("client_request_id") == "rr-1"]
        calls = [x for x in recs if x["action"] == "api.call"]
        assert calls and calls[0]["resource"] == "route:/v1/rerank" and calls[0]["outcome"] == "success"
        assert calls[0]["detail"] == {"method": "POST", "status": 200} and calls[0]["actor"] == "rr-app"
    finally:
        srv.stop()


def test_answers_match_the_contract(gw: GatewayServer) -> None:
    """Every kind of answer (local cross-encoder, bi-encoder, upstream, 400, 404) against the OpenAPI document's
    schema for that status; a wrong field fails the check (not vacuous)."""
    import jsonschema

    from tests.contract.test_gateway_contract import check

    doc = httpx.get(gw.url + "/openapi.json", timeout=10).json()
    for path in ("/v1/rerank", "/rerank"):
        for body in ({"model": "ce", "query": QUERY, "documents": DOCS, "top_n": 2},
                     {"model": "emb", "query": QUERY, "documents": [{"text": DOCS[0]}], "return_documents": False},
                     {"model": "mock-rerank", "query": QUERY, "documents": DOCS}):
            r = _post(gw, body, path)
            assert r.status_code == 200 and check(doc, path, "post", r)["results"], r.text
        r = _post(gw, {"model": "ce", "query": "q", "documents": ["a"] * 6}, path)
        assert r.status_code == 400 and check(doc, path, "post", r)["error"]["code"] == "too_many_documents"
        r = _post(gw, {"model": "ghost", "query": "q", "documents": ["a"]}, path)
        assert r.status_code == 404 and check(doc, path, "post", r)["error"]["code"] == "model_not_found"
    real = _post(gw, {"model": "ce", "query": QUERY, "documents": DOCS}).json()
    for broken in ({**real, "method": "magic"}, {k: v for k, v in real.items() if k != "results"},
                   {**real, "results": [{"index": 0}]}):
        with pytest.raises(jsonschema.ValidationError):
            check(doc, "/v1/rerank", "post", httpx.Response(200, json=broken))
