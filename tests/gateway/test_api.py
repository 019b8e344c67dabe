"""The OpenAI-compatible surface, through the official `openai` SDK (sync and async)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import GatewayServer, MockUpstream, upstream

MSG = [{"role": "user", "content": "hello there"}]




class FakeLocal:
    """A stand-in for the inference capability's `LocalEmbedder` (capability.py): an exchange and names."""

    def __init__(self, exchange: Any = None, names: list[str] | None = None) -> None:
        self.exchange = exchange
        self.names = names or []

    async def embed(self, model: str | None, inputs: list[str]) -> Any:
        raise NotImplementedError

    async def embeddings_body(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.exchange(body))

    def model_names(self) -> list[str]:
        return list(self.names)

def client(gw: GatewayServer, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=10)


def test_chat_non_stream_sync(gateway: GatewayServer) -> None:
    r = client(gateway).chat.completions.create(model="mock-model", messages=MSG, max_tokens=5)
    assert r.choices[0].message.content == "xxx " * 5
    assert r.usage is not None and r.usage.completion_tokens == 5 and r.usage.prompt_tokens >= 1
    assert r.model == "mock-model"


def test_chat_stream_sync_with_usage(gateway: GatewayServer) -> None:
    stream = client(gateway).chat.completions.create(
        model="mock-model", messages=MSG, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "xxx " * 4
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_stream_without_usage_hides_the_usage_chunk_gateway_asked_for(gateway: GatewayServer, mock: MockUpstream
                                                                      ) -> None:
    chunks = list(client(gateway).chat.completions.create(model="mock-model", messages=MSG, max_tokens=3,
                                                          stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ...while the gateway did ask the upstream for usage (for metrics and token limits)
    assert mock.last()["body"]["stream_options"] == {"include_usage": True}


async def test_chat_async_stream_and_non_stream(gateway: GatewayServer) -> None:
    ac = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-test", max_retries=0, timeout=10)
    r = await ac.chat.completions.create(model="mock-model", messages=MSG, max_tokens=2)
    assert r.choices[0].message.content == "xxx xxx "
    text = ""
    async for c in await ac.chat.completions.create(model="mock-model", messages=MSG, max_tokens=6, stream=True):
        if c.choices:
            text += c.choices[0].delta.content or ""
    assert text == "xxx " * 6
    await ac.close()


def test_completions_stream_and_non_stream(gateway: GatewayServer) -> None:
    c = client(gateway)
    r = c.completions.create(model="mock-model", prompt="once upon a time", max_tokens=3)
    assert r.choices[0].text == "xxx " * 3
    parts = [ch.choices[0].text for ch in c.completions.create(model="mock-model", prompt="x", max_tokens=3,
                                                                stream=True) if ch.choices]
    assert "".join(parts) == "xxx " * 3


def test_embeddings_upstream(gateway: GatewayServer) -> None:
    r = client(gateway).embeddings.create(model="mock-model", input=["a", "b", "c"])
    assert len(r.data) == 3 and len(r.data[0].embedding) == 8


def test_embeddings_local_model_goes_to_local_embedder(gateway: GatewayServer) -> None:
    calls: list[tuple[str, list[str]]] = []

    async def exchange(body: dict[str, Any]) -> dict[str, Any]:
        calls.append((body["model"], body["input"]))
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [1.0, 0.0]}
                                           for i in range(len(body["input"]))],
                "model": body["model"], "usage": {"prompt_tokens": 2, "total_tokens": 2}}

    local = gateway.capability.service.local  # what gateway/capability.py takes from Services.local_embedder
    local.embedder = FakeLocal(exchange)
    try:
        r = client(gateway).embeddings.create(model="local-minilm", input=["x", "y"])
    finally:
        local.embedder = None
    assert calls == [("local-minilm", ["x", "y"])]
    assert [d.embedding for d in r.data] == [[1.0, 0.0], [1.0, 0.0]]


def test_unknown_embedding_model_without_local_embedder_is_404(gateway: GatewayServer) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        client(gateway).embeddings.create(model="nope", input="x")
    assert ei.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_models_lists_models_and_aliases(gateway: GatewayServer) -> None:
    ids = {m.id for m in client(gateway).models.list()}
    assert {"mock-model", "other-model", "mock-alias"} <= ids


def test_alias_rewritten_unknown_fields_pass_through_and_upstream_key(gateway_factory: Any, mock: MockUpstream
                                                                     ) -> None:
    mock.configure(api_key="upstream-secret")
    gw = gateway_factory([upstream(mock, aliases={"fast": "mock-model"}, api_key="upstream-secret")])
    r = client(gw, key="client-key").chat.completions.create(
        model="fast", messages=MSG, max_tokens=2,
        extra_body={"guided_json": {"type": "object"}, "top_k": 7, "mock": {"token_bytes": 2}},
    )
    assert r.choices[0].message.content == "x x "
    last = mock.last()
    assert last["body"]["model"] == "mock-model"
    assert last["body"]["guided_json"] == {"type": "object"} and last["body"]["top_k"] == 7
    assert last["headers"]["authorization"] == "Bearer upstream-secret"  # never the client's key
    assert len(last["headers"]["x-request-id"]) >= 16  # the gateway's request id, for tracing


def test_body_forwarded_byte_for_byte_when_nothing_changes(gateway: GatewayServer, mock: MockUpstream) -> None:
    raw = b'{"model":"mock-model","messages":[{"role":"user","content":"hi","x_extra":[1,2.5,null]}],"max_tokens":1}'
    r = httpx.post(gateway.base_url + "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert mock.last()["body"]["messages"][0]["x_extra"] == [1, 2.5, None]


def test_sse_headers(gateway: GatewayServer) -> None:
    with httpx.stream("POST", gateway.base_url + "/chat/completions",
                      json={"model": "mock-model", "messages": MSG, "stream": True, "max_tokens": 2}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        body = r.read()
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"model": "mock-model", "messages": "hello"}', 400, "invalid_parameter"),
        (b'{"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400,
         "invalid_parameter"),
        (b'{"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400,
         "invalid_parameter"),
        (b'{"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400,
         "invalid_parameter"),
        (b'{"model": 12, "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_parameter"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "invalid_parameter"),
        (b'{"model": "mock-model", "messages": []}', 400, "invalid_parameter"),
        (b'{"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999999}', 400,
         "max_tokens_too_large"),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
    ],
)
def test_bad_input(gateway: GatewayServer, payload: bytes, status: int, code: str) -> None:
    r = httpx.post(gateway.base_url + "/chat/completions", content=payload,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_huge_max_tokens_through_sdk_is_400(gateway: GatewayServer) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(gateway).chat.completions.create(model="mock-model", messages=MSG, max_tokens=10**9)
    assert ei.value.body["code"] == "max_tokens_too_large"  # type: ignore[index]
    assert ei.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_unknown_model_through_sdk_is_404(gateway: GatewayServer) -> None:
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="gpt-9", messages=MSG)


def test_body_too_large_is_413(gateway: GatewayServer) -> None:
    big = b'{"model": "mock-model", "messages": [{"role": "user", "content": "' + b"a" * (9 * 1024 * 1024) + b'"}]}'
    r = httpx.post(gateway.base_url + "/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_upstream_4xx_is_relayed_not_retried(gateway_factory: Any, mocks: list[MockUpstream], mock: MockUpstream
                                             ) -> None:
    gw = gateway_factory([upstream(mocks[0]), upstream(mocks[1])])
    mocks[0].configure(api_key="needed")
    mocks[1].configure(api_key="needed")
    r = httpx.post(gw.base_url + "/chat/completions", json={"model": "mock-model", "messages": MSG})
    assert r.status_code == 401
    assert mocks[0].stats()["unauthorized"] + mocks[1].stats()["unauthorized"] == 1  # not retried
    assert "bad api key" in r.json()["error"]["message"] and r.json()["error"]["code"] == "upstream_rejected"


def test_embeddings_not_forwarded_to_upstream_with_embeddings_off(gateway_factory: Any, mock: MockUpstream) -> None:
    gw = gateway_factory([upstream(mock, embeddings=False)])
    with pytest.raises(openai.NotFoundError):
        client(gw).embeddings.create(model="mock-model", input="x")
    assert mock.stats()["requests"] == 0
    # chat still goes to it
    assert client(gw).chat.completions.create(model="mock-model", messages=MSG, max_tokens=1).choices


def test_in_process_calls_and_local_models(gateway: GatewayServer) -> None:
    assert {"mock-model", "other-model", "mock-alias"} <= gateway.capability.service.upstream_models()

    async def call() -> tuple[int, bytes]:
        fn = gateway.capability.complete
        return await fn("/v1/chat/completions", {"model": "mock-alias", "messages": MSG, "max_tokens": 2})

    status, body = gateway.call(call)
    assert status == 200 and b"xxx xxx " in body

    local = gateway.capability.service.local
    local.embedder = FakeLocal(names=["bge-small-zh", "mock-model"])
    try:
        ids = [m.id for m in client(gateway).models.list()]
    finally:
        local.embedder = None
    assert "bge-small-zh" in ids and ids.count("mock-model") == 1


def test_embeddings_local_exchange_preferred_and_default_model(gateway: GatewayServer) -> None:
    seen: list[dict[str, Any]] = []

    async def exchange(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                "model": body.get("model") or "all-minilm-l6-v2", "usage": {"prompt_tokens": 1, "total_tokens": 1}}

    local = gateway.capability.service.local
    local.embedder = FakeLocal(exchange)
    try:
        r = httpx.post(gateway.base_url + "/embeddings", json={"input": "x"})  # no model: the configured default
        assert r.status_code == 200 and r.json()["model"] == seen[-1]["model"] == "multilingual-e5-small-int8"
        r = httpx.post(gateway.base_url + "/embeddings", json={"model": "bge-m3", "input": "x", "dimensions": 1})
        assert r.status_code == 200 and seen[-1]["dimensions"] == 1  # passed as is
        up = client(gateway).embeddings.create(model="mock-model", input="x")  # upstream models still go upstream
        assert len(up.data[0].embedding) == 8
    finally:
        local.embedder = None
    assert len(seen) == 2


def test_with_the_real_inference_capability(tmp_path: Any, mock: MockUpstream) -> None:
    """The gateway owns /v1/embeddings in the full app; local names go to the inference capability."""
    from tests.gateway.conftest import GATEWAY_CAP, make_settings

    gw = GatewayServer(make_settings(tmp_path, [upstream(mock)]), [GATEWAY_CAP, "xcstack.inference.capability"])
    gw.start()
    try:
        r = httpx.post(gw.base_url + "/embeddings", json={"model": "not-a-local-model", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert client(gw).embeddings.create(model="mock-model", input="x").data  # upstream
    finally:
        gw.stop()


@pytest.mark.parametrize(("body", "ctype", "message", "etype"), [
    (b'{"object":"error","message":"context too long","type":"BadRequestError","param":null,"code":400}',
     "application/json", "context too long", "BadRequestError"),  # vLLM's flat shape, integer code
    (b'{"error":{"message":"bad temp","type":"invalid_request_error","param":"temperature","code":null}}',
     "application/json", "bad temp", "invalid_request_error"),  # OpenAI's
    (b"plain words", "text/plain", "plain words", "invalid_request_error"),
])
def test_upstream_rejection_is_relayed_in_the_error_model(body: bytes, ctype: str, message: str, etype: str) -> None:
    from xcstack.gateway.failover import rejection_body

    out = json.loads(rejection_body("u1", 400, body))
    assert out == {"error": {"type": etype, "code": "upstream_rejected", "message": message,
                             **({"param": "temperature"} if "temperature" in body.decode() else {})}}
