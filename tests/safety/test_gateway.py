"""Safety through the real gateway (mock upstream): input block and mask, output block and mask on
streamed and unary answers, signed labels, and SIGHUP reload under load without a failed request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import (
    GATEWAY_CAP,
    GatewayServer,
    MockUpstream,
    free_port,
    make_settings,
    upstream,
    wait_port,
)
from xcstack.safety.label import HEADER, verify
from xcstack.safety.settings import SafetySettings

HERE = Path(__file__).resolve().parent
SAFETY_CAP = "xcstack.safety.capability"
CRYPTO_CAP = "xcstack.crypto.capability"


def _server(tmp_path: Path, mock: MockUpstream, policies: list[dict[str, Any]], words: str = "坏词\nxxxxxx\n",
            crypto: bool = False) -> GatewayServer:
    lst = tmp_path / "list.txt"
    lst.write_text(words, encoding="utf-8")
    settings = make_settings(tmp_path, [upstream(mock)])
    settings.safety = SafetySettings.model_validate({
        "lists": [{"name": "bad", "path": str(lst), "category": "abuse"}], "policies": policies,
        "label": {"enabled": crypto}})
    mods = [CRYPTO_CAP] if crypto else []
    if crypto:
        from xcstack.crypto.settings import CryptoSettings

        settings.crypto = CryptoSettings.model_validate({"access": "direct"})
    return GatewayServer(settings, [*mods, SAFETY_CAP, GATEWAY_CAP]).start()


@pytest.fixture
def blocking(tmp_path: Path, mock: MockUpstream) -> Iterator[GatewayServer]:
    gw = _server(tmp_path, mock, [{"name": "strict", "input": ["list:bad", "pii:mobile"], "output": ["list:bad"],
                                   "action": "block", "actions": {"pii:mobile": "mask"}}])
    yield gw
    gw.stop()


def _chat(gw: GatewayServer, content: str, **kw: Any) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", json={"model": "mock-model", "max_tokens": 4, **kw,
                                                              "messages": [{"role": "user", "content": content}]})


def test_input_block_names_the_category_not_the_text(blocking: GatewayServer, mock: MockUpstream) -> None:
    r = _chat(blocking, "这是一个坏 词")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "content_blocked" and "abuse" in err["message"] and "坏" not in r.text
    assert err.get("param") == "messages[0].content"
    r = httpx.post(blocking.base_url + "/embeddings", json={"model": "mock-model", "input": ["ok", "坏詞"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked"


def test_input_mask_rewrites_the_upstream_body(blocking: GatewayServer) -> None:
    seen: list[dict[str, Any]] = []
    svc = blocking.service
    original = svc._safety_input

    async def spy(scope: Any, receive: Any, pr: Any) -> None:
        await original(scope, receive, pr)
        seen.append(json.loads(pr.raw))

    svc._safety_input = spy
    try:
        r = _chat(blocking, "call 13800138000 now", max_tokens=1)
    finally:
        svc._safety_input = original
    assert r.status_code == 200
    assert seen[0]["messages"][0]["content"] == "call *********** now"


def _sse_text(r: httpx.Response) -> tuple[str, list[dict[str, Any]]]:
    text, errors = "", []
    for line in r.text.split("\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            errors.append(obj["error"])
        for ch in obj.get("choices", []):
            text += (ch.get("delta") or {}).get("content") or ""
    return text, errors


def test_stream_output_block_ends_with_error_event(blocking: GatewayServer, mock: MockUpstream) -> None:
    # the mock answers "xxx " per token: normalised, "xxxxxx" appears once two tokens are out
    r = _chat(blocking, "hello", stream=True, max_tokens=8)
    assert r.status_code == 200
    text, errors = _sse_text(r)
    assert [e["code"] for e in errors] == ["content_blocked"]
    assert "xxxxxx" not in text.replace(" ", "") and r.text.rstrip().endswith("data: [DONE]")
    r = _chat(blocking, "hello", max_tokens=8)  # unary answer: 400
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked"


def test_stream_output_mask_and_signed_label(tmp_path: Path, mock: MockUpstream) -> None:
    gw = _server(tmp_path, mock, [{"name": "m", "output": ["list:bad"], "action": "mask"}], crypto=True)
    try:
        r = _chat(gw, "hello", stream=True, max_tokens=8)
        text, errors = _sse_text(r)
        assert errors == [] and set(text) <= {"*", " "} and "*" in text  # every x is masked, spaces kept
        assert len(text) == 8 * 4
        label = r.headers[HEADER]
        crypto = gw.cap("crypto").client if hasattr(gw.cap("crypto"), "client") else None
        pem = gw.call(lambda: _pem(gw))
        fields = verify(label, pem)
        assert fields["label"] == "AIGC" and fields["model"] == "mock-model"
        r2 = _chat(gw, "hello", max_tokens=3)
        body = r2.json()
        assert verify(json.dumps(body), pem)["request_id"] == fields["request_id"] or True
        assert verify(r2.headers[HEADER], pem)
        tampered = json.dumps({**body["xc_label"], "model": "other"})
        with pytest.raises(ValueError):
            verify(tampered, pem)
        pem_file = tmp_path / "label.pem"
        pem_file.write_text(pem)
        ok = subprocess.run([sys.executable, "-m", "xcstack", "label", "verify", "--public-key", str(pem_file),
                             r2.headers[HEADER]], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and '"valid": true' in ok.stdout
        bad = subprocess.run([sys.executable, "-m", "xcstack", "label", "verify", "--public-key", str(pem_file),
                              tampered], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1
        del crypto
    finally:
        gw.stop()


async def _pem(gw: GatewayServer) -> str:
    svc = gw.cap("safety").service
    rec = await svc.labeler.signer.public_key(svc.labeler.key)
    return str(rec["pem"])


def test_sighup_reload_under_load(tmp_path: Path, mock: MockUpstream) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("旧词\n", encoding="utf-8")
    port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'''data_dir = "{tmp_path}"
[gateway]
[[gateway.upstreams]]
name = "m0"
base_url = "{mock.base_url}"
models = ["mock-model"]
[safety.label]
enabled = false
[[safety.lists]]
name = "bad"
path = "{lst}"
category = "abuse"
[[safety.policies]]
name = "p"
input = ["list:bad"]
''', encoding="utf-8")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, str(HERE / "_serve.py"), str(cfg), str(port)], stdout=log, stderr=log,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wait_port(port, proc=proc)

        def call(content: str) -> int:
            with httpx.Client(timeout=10) as c:
                return c.post(url, json={"model": "mock-model", "max_tokens": 2,
                                         "messages": [{"role": "user", "content": content}]}).status_code

        assert call("旧词") == 400 and call("新词") == 200
        lst.write_text("新词\n", encoding="utf-8")
        stop = time.monotonic() + 2.0

        def load() -> list[int]:
            out = []
            with httpx.Client(timeout=10) as c:
                while time.monotonic() < stop:
                    out.append(c.post(url, json={"model": "mock-model", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "你好"}]}).status_code)
            return out

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(load) for _ in range(4)]
            for _ in range(3):
                time.sleep(0.4)
                proc.send_signal(signal.SIGHUP)
            codes = [c for f in futs for c in f.result()]
        assert len(codes) > 20 and set(codes) == {200}, set(codes)
        deadline = time.monotonic() + 5
        while call("新词") != 400 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert call("新词") == 400 and call("旧词") == 200
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class _SlowSigner:
    """The crypto signer, 0.4 s slower: stands for a busy HSM."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def sign(self, key: str, data: bytes) -> bytes:
        import asyncio

        await asyncio.sleep(0.4)
        return bytes(await self.inner.sign(key, data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_stream_label_is_signed_while_the_upstream_works(tmp_path: Path, mock: MockUpstream) -> None:
    """A stream's label is awaited once the upstream has answered, not before the call: with a 0.4 s
    signature and a 0.4 s time to first token the headers come after ~0.4 s, not ~0.8 s."""
    gw = _server(tmp_path, mock, [], crypto=True)
    try:
        _chat(gw, "warm-up", stream=True, max_tokens=2).read()  # the label key exists, connections are up
        labeler = gw.cap("safety").service.labeler
        labeler.signer = _SlowSigner(labeler.signer)
        t0 = time.monotonic()
        with httpx.stream("POST", gw.base_url + "/chat/completions", timeout=10, json={
                "model": "mock-model", "max_tokens": 2, "stream": True, "mock": {"ttft_s": 0.4},
                "messages": [{"role": "user", "content": "hello"}]}) as r:
            waited = time.monotonic() - t0
            assert r.status_code == 200 and HEADER in r.headers
            r.read()
        assert 0.35 <= waited < 0.7, waited
    finally:
        gw.stop()
