"""The gateway's OpenAPI contract against its real answers: a gateway in front of the `xcstack mock-upstream`
test double, each answer validated (JSON Schema 2020-12, as OpenAPI 3.1 defines it) against the schema the
document gives for that operation and status, so a documented field that is wrong (missing, mistyped, not
nullable) fails here before a client or the fuzzer meets it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import jsonschema
import pytest
from starlette.testclient import TestClient

from tests.gateway.conftest import GatewayServer, MockUpstream, make_settings, upstream
from xcstack.app import create_app

DEFAULT_EMBEDDING = "multilingual-e5-small-int8"  # the inference settings' default embedding model
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    m = MockUpstream("contract")
    yield m
    m.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock: MockUpstream) -> Iterator[GatewayServer]:
    # the upstream also serves the default embedding model's name: /v1/embeddings without `model` reaches it
    settings = make_settings(tmp_path_factory.mktemp("gwc"),
                             [upstream(mock, models=["mock-model", DEFAULT_EMBEDDING])], jobs={"poll_s": 0.05})
    server = GatewayServer(settings).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def doc(gw: GatewayServer) -> dict[str, Any]:
    r = httpx.get(gw.url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    return dict(r.json())


def _schema(doc: dict[str, Any], path: str, method: str, status: int,
            media: str = "application/json") -> dict[str, Any]:
    """The documented schema of one answer (following a `#/components/responses/...` reference)."""
    op = doc["paths"][path][method]
    assert "x-xc-undocumented" not in op, f"{method.upper()} {path} has no contract"
    resp = op["responses"].get(str(status))
    assert resp is not None, f"{method.upper()} {path} answered {status}, which the document does not list"
    if "$ref" in resp:
        resp = doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    schema = resp["content"][media]["schema"]
    assert schema, f"{method.upper()} {path} {status}: empty schema (documents nothing)"
    return dict(schema)


class Answer(Protocol):
    """An httpx response (or the test client's, from its own httpx copy)."""

    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


def check(doc: dict[str, Any], path: str, method: str, r: Answer) -> Any:
    """Validate a real answer against the document; returns its JSON."""
    schema = _schema(doc, path, method, r.status_code)
    body = r.json()
    # the document's `#/components/...` references resolve against the root schema, which carries them
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(body)
    return body


def test_chat_and_completions_answers_match_the_contract(gw: GatewayServer, doc: dict[str, Any]) -> None:
    r = httpx.post(gw.base_url + "/chat/completions", json=CHAT, timeout=10)
    body = check(doc, "/v1/chat/completions", "post", r)
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert "ChatCompletion" in _schema(doc, "/v1/chat/completions", "post", 200)["$ref"]
    r = httpx.post(gw.base_url + "/completions", json={"model": "mock-model", "prompt": "hi", "max_tokens": 2},
                   timeout=10)
    assert check(doc, "/v1/completions", "post", r)["object"] == "text_completion"
    # a stream answers a documented media type
    with httpx.stream("POST", gw.base_url + "/chat/completions", json={**CHAT, "stream": True}, timeout=10) as s:
        assert s.status_code == 200
        media = s.headers["content-type"].split(";")[0]
        assert media in doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
        assert s.read().rstrip().endswith(b"data: [DONE]")


def test_the_validation_is_not_vacuous(gw: GatewayServer, doc: dict[str, Any]) -> None:
    """A real answer with one documented field wrong must fail the check."""
    real = httpx.post(gw.base_url + "/chat/completions", json=CHAT, timeout=10)
    for broken in ({**real.json(), "created": "yesterday"}, {k: v for k, v in real.json().items() if k != "choices"},
                   {**real.json(), "usage": {"prompt_tokens": 1}}):
        fake = httpx.Response(200, json=broken)
        with pytest.raises(jsonschema.ValidationError):
            check(doc, "/v1/chat/completions", "post", fake)


def test_error_answers_match_the_contract(gw: GatewayServer, mock: MockUpstream, doc: dict[str, Any]) -> None:
    r = httpx.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "no-such-model"}, timeout=10)
    assert r.status_code == 404 and check(doc, "/v1/chat/completions", "post", r)["error"]["code"] == "model_not_found"
    r = httpx.post(gw.base_url + "/chat/completions", json={**CHAT, "max_tokens": True}, timeout=10)
    assert r.status_code == 400 and check(doc, "/v1/chat/completions", "post", r)["error"]["code"] == \
        "invalid_parameter"
    r = httpx.post(gw.base_url + "/completions", json={"model": "mock-model", "prompt": "x",
                                                        "mock": {"fault": "500"}}, timeout=10)
    assert r.status_code == 502 and check(doc, "/v1/completions", "post", r)["error"]["code"] == "upstream_error"


def test_embeddings_and_models_match_the_contract(gw: GatewayServer, doc: dict[str, Any]) -> None:
    r = httpx.post(gw.base_url + "/embeddings", json={"model": "mock-model", "input": ["a", "b"]}, timeout=10)
    body = check(doc, "/v1/embeddings", "post", r)
    assert r.status_code == 200 and len(body["data"]) == 2
    # `model` is documented as optional, and it is: the default embedding model answers
    ref = doc["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "model" not in request.get("required", [])
    r = httpx.post(gw.base_url + "/embeddings", json={"input": "a"}, timeout=10)
    assert r.status_code == 200 and check(doc, "/v1/embeddings", "post", r)["model"] == DEFAULT_EMBEDDING
    r = httpx.get(gw.base_url + "/models", timeout=10)
    assert {m["id"] for m in check(doc, "/v1/models", "get", r)["data"]} == {"mock-model", DEFAULT_EMBEDDING}


def test_jobs_match_the_contract(gw: GatewayServer, doc: dict[str, Any]) -> None:
    h = {"Authorization": "Bearer contract-jobs"}
    r = httpx.post(gw.base_url + "/jobs", json={"body": CHAT, "metadata": {"k": "v"}}, headers=h, timeout=10)
    assert r.status_code == 202, r.text
    job = check(doc, "/v1/jobs", "post", r)
    url = f"{gw.base_url}/jobs/{job['id']}"
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(url, headers=h, timeout=10)
        current = check(doc, "/v1/jobs/{job_id}", "get", r)
        if current["status"] == "succeeded" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert current["status"] == "succeeded" and current["result"]["object"] == "chat.completion"
    assert check(doc, "/v1/jobs", "get", httpx.get(gw.base_url + "/jobs", headers=h, timeout=10))["data"]
    # a failed job: its error object is documented too
    r = httpx.post(gw.base_url + "/jobs", json={"body": {**CHAT, "mock": {"fault": "500"}}}, headers=h, timeout=10)
    failed = check(doc, "/v1/jobs", "post", r)
    deadline = time.monotonic() + 10
    while (current := check(doc, "/v1/jobs/{job_id}", "get", httpx.get(
            f"{gw.base_url}/jobs/{failed['id']}", headers=h, timeout=10)))["status"] != "failed":
        assert time.monotonic() < deadline, current
        time.sleep(0.05)
    assert current["http_status"] == 502 and current["error"]["code"] == "upstream_error"
    r = httpx.delete(url, headers=h, timeout=10)  # finished: answered unchanged
    assert check(doc, "/v1/jobs/{job_id}", "delete", r)["status"] == "succeeded"
    r = httpx.get(gw.base_url + "/jobs/job_missing", headers=h, timeout=10)
    assert r.status_code == 404 and check(doc, "/v1/jobs/{job_id}", "get", r)["error"]["code"] == "job_not_found"
    r = httpx.post(gw.base_url + "/jobs", json={"body": {**CHAT, "model": "no-such-model"}}, headers=h, timeout=10)
    assert r.status_code == 404 and check(doc, "/v1/jobs", "post", r)["error"]["code"] == "model_not_found"


def test_disabled_jobs_are_documented_as_such(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [{"name": "never", "base_url": "http://127.0.0.1:9/v1",
                                         "models": ["mock-model"]}], jobs={"enabled": False})
    app = create_app(settings, capability_modules=["xcstack.gateway.capability"])
    with TestClient(app) as c:
        doc = c.get("/openapi.json").json()
        for path, method in (("/v1/jobs", "post"), ("/v1/jobs/{job_id}", "delete")):
            responses = doc["paths"][path][method]["responses"]
            assert not [s for s in responses if s.startswith("2")], "a disabled route never succeeds"
        r = c.get("/v1/jobs/anything")
        assert r.status_code == 404
        assert check(doc, "/v1/jobs/{job_id}", "get", r)["error"]["code"] == "jobs_disabled"
