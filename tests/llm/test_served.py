"""The real Qwen2.5-Coder-0.5B under the real supervisor (`xcstack serve`), behind the gateway: chat and
completions through the official `openai` SDK (streamed and not), the context limits, slots and the
bounded queue, a client that leaves mid-stream, a worker killed mid-stream. One model load per session
(plus the respawn); generations are a few tokens (the 0.5B decodes ~2-8 tok/s on 2 busy cores)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.core.served import Served
from xcstack.llm.assemble import BUILTINS, assemble, is_current
from xcstack.llm.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
QUESTION = "北京是哪个国家的首都？"
LONG = "Count from 1 to 500, one number per line."


@pytest.fixture(scope="session")
def llm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model assembled from its chunk packages (installed by the dev extra) once per session;
    XC_TEST_LLM_REPO names a repository that already holds it (a manual run's cache)."""
    model = BUILTINS[MODEL]
    cached = os.environ.get("XC_TEST_LLM_REPO")
    if cached and is_current(Path(cached), MODEL, model.sha256):
        return Path(cached)
    root = tmp_path_factory.mktemp("llm-models")
    assemble(model, root)
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, llm_repo: Path) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("llm-served"), plugins="[]", env={
        "XC_LLM__REPOSITORY": str(llm_repo),
        "XC_LLM__SLOTS": "2",
        "XC_LLM__CTX_SIZE": "512",
        "XC_LLM__MAX_QUEUE": "1",
        "XC_GATEWAY__QUEUE_TIMEOUT_S": "120",  # the queued request waits for a slot, however slow the host
        "XC_INFERENCE__ENABLED": "false",
        "XC_VECTOR__ENABLED": "false",
        "XC_SERVER__RESPAWN_BACKOFF_MAX_S": "0.5",
    })
    s.start(timeout=240)
    yield s
    s.stop()


def llm_pid(served: Served) -> int:
    assert served.proc is not None
    out = subprocess.run(["pgrep", "-P", str(served.proc.pid), "-f", "xcstack.llm.worker:main"],
                         capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, pids
    return pids[0]


def worker_slots(served: Served) -> list[dict[str, Any]]:
    """llama.cpp's own /slots, with the port and key the supervisor gave the worker (its environment)."""
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{llm_pid(served)}/environ").read_text().split("\0") if "=" in kv)
    req = urllib.request.Request(f"http://127.0.0.1:{env['XC_LLM_PORT']}/slots",
                                 headers={"Authorization": f"Bearer {env['XC_LLM_KEY']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return list(json.loads(r.read()))


def post(served: Served, path: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(served.base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read() or b"{}")


class RawStream:
    """A streamed chat request on its own socket, so the test decides when the client leaves."""

    def __init__(self, served: Served, content: str, max_tokens: int) -> None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": True,
                           "max_tokens": max_tokens, "temperature": 0}).encode()
        self.sock = socket.create_connection(("127.0.0.1", served.port), timeout=180)
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.buf = b""
        self.times: list[float] = []

    def read_until(self, events: int) -> None:
        while self.buf.count(b"data:") < events:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"stream ended: {self.buf[-500:]!r}")
            self.buf += chunk
            self.times.append(time.monotonic())

    def read_all(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.buf += chunk
            if self.buf.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the chunked body
                break
        return self.buf

    def close(self) -> None:
        self.sock.close()


def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base + "/v1", api_key="not-needed", max_retries=0, timeout=180)


def sensible(answer: str) -> bool:
    return "中国" in answer or "中华人民共和国" in answer


def test_models_and_chat_through_the_openai_sdk_streamed_and_not(served: Served) -> None:
    c = client(served)
    assert MODEL in [m.id for m in c.models.list().data]
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
                                  temperature=0, seed=7)
    answer = r.choices[0].message.content or ""
    assert sensible(answer), answer
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 16 and r.model == MODEL
    text, usage = "", None
    for chunk in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=16, temperature=0, seed=7, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert sensible(text), text
    assert usage is not None and usage.prompt_tokens > 0
    # the gateway's metrics count the local model as an upstream
    with urllib.request.urlopen(served.base + "/metrics", timeout=10) as resp:
        assert 'upstream="local-llm"' in resp.read().decode()


def test_completions_with_stop_top_p_and_seed(served: Served) -> None:
    status, _, body = post(served, "/v1/completions", {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 8,
                                                        "temperature": 0, "top_p": 0.9, "seed": 1, "stop": ["7"]})
    assert status == 200, body
    assert "7" not in body["choices"][0]["text"] and body["usage"]["completion_tokens"] <= 8


def test_prompt_longer_than_the_context_is_400_context_length_exceeded(served: Served) -> None:
    c = client(served)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 700}],
                                      max_tokens=4, stream=stream)
        err = info.value.body
        assert isinstance(err, dict), err
        assert (err["code"], err["type"], err["param"]) == ("context_length_exceeded", "invalid_request_error",
                                                           "messages"), err
        assert "512" in err["message"]


def test_max_tokens_beyond_the_context_is_a_clear_400(served: Served) -> None:
    status, _, body = post(served, "/v1/chat/completions", {"model": MODEL, "max_tokens": 600,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["code"] == "max_tokens_too_large", body
    assert "context of 512 tokens" in body["error"]["message"]


def test_full_slots_queue_then_503_and_a_departed_client_frees_its_slot(served: Served) -> None:
    held = [RawStream(served, LONG, 300) for _ in range(2)]  # every slot
    try:
        for s in held:
            s.read_until(4)
        queued = RawStream(served, "Say OK.", 2)  # waits in the gateway's bounded queue (max_queue 1)
        time.sleep(0.5)
        t0 = time.monotonic()
        status, headers, body = post(served, "/v1/chat/completions", {
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and body["error"]["code"] == "overloaded", body
        assert int(headers["retry-after"]) >= 1 and time.monotonic() - t0 < 2  # at once, not after a wait
        before = {sl["id"]: sl.get("id_task") for sl in worker_slots(served) if sl.get("is_processing")}
        assert len(before) == 2, before
        gaps = [b - a for a, b in zip(held[0].times, held[0].times[1:], strict=False)]
        step = statistics.median(gaps) if gaps else 0.1
        held[0].read_until(held[0].buf.count(b"data:") + 1)
        held[0].close()
        gone = time.monotonic()
        freed = None
        while time.monotonic() - gone < 30:
            now = {sl["id"]: sl.get("id_task") for sl in worker_slots(served) if sl.get("is_processing")}
            if now != before:  # the departed client's slot is free, or already runs the queued request
                freed = time.monotonic() - gone
                break
        assert freed is not None, "the slot of a departed client stayed busy"
        queued.read_until(1)  # the queued request started
        started = time.monotonic() - gone
        print(f"\nslot freed {freed * 1000:.0f} ms after the disconnect (one decode step here: {step * 1000:.0f} ms; "
              f"/slots itself answers between decode steps); queued request's first event after {started:.2f}s")
        # llama.cpp notices a closed connection when it next writes a token and frees the slot at its next
        # loop: within ~2 decode steps; on an idle core a step is < 50 ms (docs/benchmarks.md#llm)
        assert freed < max(0.1, 3 * step) + 0.05, (freed, step)
        assert b"data: [DONE]" in queued.read_all()
    finally:
        for s in held:
            s.close()


def test_worker_killed_mid_stream_error_event_then_respawn(served: Served) -> None:
    pid = llm_pid(served)
    s = RawStream(served, LONG, 200)
    try:
        s.read_until(3)
        os.kill(pid, signal.SIGKILL)
        tail = s.read_all().decode("utf-8", "replace")
    finally:
        s.close()
    assert '"error"' in tail and "stream_interrupted" in tail, tail[-600:]
    assert tail.index("stream_interrupted") < tail.index("data: [DONE]"), tail[-300:]  # the error, then the end
    deadline = time.monotonic() + 180
    seen: list[int] = []
    while time.monotonic() < deadline:
        status, headers, body = post(served, "/v1/chat/completions", {
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        seen.append(status)
        if status == 200:
            break
        assert status == 503 and "retry-after" in headers, (status, body)
        time.sleep(0.5)
    assert seen[-1] == 200, seen
    assert llm_pid(served) != pid
