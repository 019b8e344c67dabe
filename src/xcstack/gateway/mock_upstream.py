"""`xcstack mock-upstream`: a TEST DOUBLE of an OpenAI-compatible LLM server (vLLM-like).

It is not a model server. It exists so the gateway can be tested and benchmarked without GPUs:

- answers `/v1/chat/completions`, `/v1/completions` (streamed and not), `/v1/embeddings`, `/v1/rerank`
  (vLLM's shape, a toy lexical score), `/v1/models`;
- configurable time-to-first-token, tokens per second, bytes per token, usage in the last chunk
  (`stream_options.include_usage`), like vLLM;
- notices and records client disconnects while it is generating (vLLM aborts the request only when
  its client connection closes; this double records when and after how many chunks);
- injected faults: `500`, `429`, `reset` (connection reset before the answer), `reset_mid`
  (reset after `fault_after` chunks), `stall` (stop sending after `fault_after` chunks, keep the
  connection open), `stall_headers` (never answer);
- honours TCP backpressure: a slow reader pauses generation (no unbounded buffering here either).

Control: `GET /mock/stats`, `POST /mock/reset`, `POST /mock/config` (JSON, same keys as below),
`GET /mock/last` (the last request's headers and body). Per request, a `"mock": {...}` object in
the body overrides the config for that request (the gateway passes unknown fields through).

A raw asyncio + httptools HTTP/1.1 server: the benchmark compares the gateway against calling this
server directly, so the double must not be the bottleneck.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import httptools

from xcstack.httputil import dumps, loads

FAULTS = ("", "500", "429", "reset", "reset_mid", "stall", "stall_headers")


@dataclass
class MockConfig:
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0  # 0: as fast as the client reads
    token_bytes: int = 4  # bytes of text per token (per chunk)
    tokens: int = 16  # default completion length when the request gives no max_tokens
    max_tokens_cap: int = 10_000_000
    fault: str = ""
    fault_after: int = 0  # chunks sent before reset_mid / stall
    fault_times: int = -1  # how many requests get the fault; -1: all
    embedding_dim: int = 8
    api_key: str = ""  # when set, require `Authorization: Bearer <api_key>`
    models: list[str] = field(default_factory=lambda: ["mock-model"])
    name: str = "mock"

    def update(self, data: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        for key, value in data.items():
            if key not in names:
                raise ValueError(f"unknown mock setting {key!r}")
            setattr(self, key, value)
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")


@dataclass
class MockStats:
    requests: int = 0
    unauthorized: int = 0
    completed: int = 0
    in_flight: int = 0
    disconnects: int = 0
    faults: int = 0
    chunks_sent: int = 0
    disconnect_events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["disconnect_events"] = list(self.disconnect_events)
        return d


class MockState:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = MockStats()
        self.last: dict[str, Any] = {}
        self.ids = itertools.count(1)

    def take_fault(self, override: str | None) -> str:
        if override is not None:
            return override
        cfg = self.config
        if not cfg.fault or cfg.fault_times == 0:
            return ""
        if cfg.fault_times > 0:
            cfg.fault_times -= 1
        return cfg.fault


_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed",
            429: b"Too Many Requests", 500: b"Internal Server Error"}


class _Request:
    __slots__ = ("body", "headers", "method", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.method = b""


class MockProtocol(asyncio.Protocol):
    """One client connection. Requests on a connection are answered in order."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: _Request | None = None
        self.pending: deque[_Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.active: dict[str, Any] | None = None  # the generation in progress
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False
        self.keep_alive = True

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write_simple(400, {"error": {"message": "bad http"}}, close=True)
        except httptools.HttpParserUpgrade:
            self._write_simple(400, {"error": {"message": "upgrade not supported"}}, close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        if self.active is not None:
            st = self.state.stats
            st.disconnects += 1
            a = self.active
            st.disconnect_events.append({"t": time.time(), "chunks": a["chunks"], "id": a["id"], "phase": a["phase"]})
            self.active = None
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = _Request()

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        self.req.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        assert self.req is not None
        self.req.body += body

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        req.method = self.parser.get_method()
        self.keep_alive = self.parser.should_keep_alive()
        self.req = None
        if self.task is not None and not self.task.done():
            self.pending.append(req)
            return
        self._dispatch(req)

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, req: _Request) -> None:
        coro = self._handle(req)
        try:
            # Fast path: a handler that completes without awaiting needs no task.
            coro.send(None)
        except StopIteration:
            self._next()
            return
        except Exception as exc:  # pragma: no cover - bug guard
            self._write_simple(500, {"error": {"message": f"mock bug: {exc!r}"}}, close=True)
            return
        coro.close()
        self.task = asyncio.get_running_loop().create_task(self._handle(req, fresh=True))
        self.task.add_done_callback(lambda _t: self._next())

    def _next(self) -> None:
        if self.pending and not self.closed:
            self._dispatch(self.pending.popleft())

    async def _handle(self, req: _Request, fresh: bool = False) -> None:
        """Answer one request. Returns without suspending when no delay is needed; otherwise
        suspends once on a dummy future so `_dispatch` can restart it in a task (re-run with
        fresh=True: every branch before the first real await is free of side effects)."""
        path = req.url.split(b"?", 1)[0]
        st = self.state
        if path.startswith(b"/mock/"):
            self._control(req, path)
            return
        if path == b"/health":
            self._write_simple(200, {"status": "ok"})
            return
        cfg = st.config
        if cfg.api_key and req.headers.get(b"authorization", b"") != b"Bearer " + cfg.api_key.encode():
            st.stats.unauthorized += 1
            self._write_simple(401, {"error": {"message": "bad api key", "type": "authentication_error"}})
            return
        if path == b"/v1/models":
            now = int(time.time())
            data = [{"id": m, "object": "model", "created": now, "owned_by": cfg.name} for m in cfg.models]
            self._write_simple(200, {"object": "list", "data": data})
            return
        kind = {b"/v1/chat/completions": "chat", b"/v1/completions": "text", b"/v1/embeddings": "embed",
                b"/v1/rerank": "rerank", b"/rerank": "rerank"}.get(path)
        if kind is None:
            self._write_simple(404, {"error": {"message": f"no route {path.decode(errors='replace')}"}})
            return
        if req.method != b"POST":
            self._write_simple(405, {"error": {"message": "POST only"}})
            return
        try:
            body = loads(bytes(req.body))
            if not isinstance(body, dict):
                raise ValueError("body must be an object")
        except ValueError as exc:
            self._write_simple(400, {"error": {"message": f"bad json: {exc}"}})
            return
        raw_mock = body.get("mock")
        mock: dict[str, Any] = raw_mock if isinstance(raw_mock, dict) else {}
        ttft = float(mock.get("ttft_s", cfg.ttft_s))
        tps = float(mock.get("tokens_per_s", cfg.tokens_per_s))
        stream = bool(body.get("stream")) and kind not in ("embed", "rerank")
        fault_override = mock.get("fault")
        needs_task = stream or ttft > 0 or (tps > 0 and kind not in ("embed", "rerank")) or fault_override in (
            "stall_headers",) or (cfg.fault in ("stall_headers",) and cfg.fault_times != 0)
        if needs_task and not fresh:
            await _suspend()  # restarted in a task by _dispatch
        if fresh or not needs_task:
            st.last = {"path": path.decode(), "headers": {k.decode(): v.decode() for k, v in req.headers.items()},
                       "body": body}
            st.stats.requests += 1
        fault = st.take_fault(fault_override)
        if fault:
            st.stats.faults += 1
        if fault == "500":
            self._write_simple(500, {"error": {"message": "injected fault", "type": "server_error"}})
            return
        if fault == "429":
            self._write_simple(429, {"error": {"message": "injected rate limit"}}, extra=b"Retry-After: 1\r\n")
            return
        if fault == "reset":
            assert self.transport is not None
            self.transport.abort()
            return
        model = str(body.get("model", "mock-model"))
        if kind == "embed":
            self._embed(body, model)
            return
        if kind == "rerank":
            if ttft > 0:
                await asyncio.sleep(ttft)
            self._rerank(body, model)
            return
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or cfg.tokens
        n = max(0, min(int(max_tokens), cfg.max_tokens_cap))
        prompt_tokens = _prompt_tokens(body)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-mock-{next(st.ids)}"
        token_bytes = int(mock.get("token_bytes", cfg.token_bytes))
        text = ("x" * max(1, token_bytes - 1)) + " "
        st.stats.in_flight += 1
        try:
            self.active = {"id": rid, "chunks": 0, "phase": "ttft"}
            if fault == "stall_headers":
                await asyncio.sleep(3600)
            if ttft > 0:
                await asyncio.sleep(ttft)
            if not stream:
                if tps > 0 and n:
                    await asyncio.sleep(n / tps)
                self.active = None
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                created = int(time.time())
                if kind == "chat":
                    out: dict[str, Any] = {
                        "id": rid, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text * n},
                                     "finish_reason": "length", "logprobs": None}],
                        "usage": usage,
                    }
                else:
                    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": 0, "text": text * n, "finish_reason": "length", "logprobs": None}],
                           "usage": usage}
                self._write_simple(200, out)
                st.stats.completed += 1
                return
            await self._stream(kind, body, rid, model, n, prompt_tokens, text, tps, fault, int(mock.get(
                "fault_after", cfg.fault_after)))
        finally:
            st.stats.in_flight -= 1
            self.active = None

    async def _stream(self, kind: str, body: dict[str, Any], rid: str, model: str, n: int, prompt_tokens: int,
                      text: str, tps: float, fault: str, fault_after: int) -> None:
        tr = self.transport
        assert tr is not None
        st = self.state
        tr.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
        created = int(time.time())
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        if kind == "chat":
            head = dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})
            tmpl = dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            last = dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        else:
            head = b""
            tmpl = dumps({"id": rid, "object": "text_completion", "created": created, "model": model,
                          "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]})
            last = dumps({"id": rid, "object": "text_completion", "created": created, "model": model,
                          "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]})
        token_frame = _chunk(b"data: " + tmpl + b"\n\n")
        assert self.active is not None
        active = self.active
        active["phase"] = "stream"
        if head:
            tr.write(_chunk(b"data: " + head + b"\n\n"))
        interval = 1.0 / tps if tps > 0 else 0.0
        next_at = time.monotonic()
        for i in range(n):
            if fault in ("reset_mid", "stall") and i == fault_after:
                if fault == "reset_mid":
                    tr.abort()
                    return
                await asyncio.sleep(3600)
            if self.closed:
                return
            tr.write(token_frame)
            active["chunks"] += 1
            st.stats.chunks_sent += 1
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if not self.writable.is_set():
                await self.writable.wait()
            elif not interval and i % 64 == 63:
                await asyncio.sleep(0)
        if self.closed:
            return
        tr.write(_chunk(b"data: " + last + b"\n\n"))
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            tr.write(_chunk(b"data: " + dumps({"id": rid, "object": obj, "created": created, "model": model,
                                                "choices": [], "usage": usage}) + b"\n\n"))
        tr.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.active = None
        st.stats.completed += 1
        if not self.keep_alive:
            tr.close()

    def _embed(self, body: dict[str, Any], model: str) -> None:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else None
        if not inputs:
            self._write_simple(400, {"error": {"message": "input must be a string or a list"}})
            return
        dim = self.state.config.embedding_dim
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = str(item)
            tokens += max(1, len(text) // 4)
            digest = hashlib.sha256(text.encode()).digest()
            vals = struct.unpack(f"{len(digest)}B", digest)
            vec = [(vals[j % len(vals)] - 127.5) / 127.5 for j in range(dim)]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        self._write_simple(200, {"object": "list", "data": data, "model": model,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        self.state.stats.completed += 1

    def _rerank(self, body: dict[str, Any], model: str) -> None:
        """vLLM's /v1/rerank: `documents` strings only (400 otherwise), `top_n` (0 or absent: all); the
        score is a toy lexical one (shared words / sqrt of both word counts), in [0, 1]."""
        query, docs, top_n = body.get("query"), body.get("documents"), body.get("top_n") or 0
        if (not isinstance(query, str) or not isinstance(docs, list) or not all(isinstance(d, str) for d in docs)
                or not isinstance(top_n, int)):
            self._write_simple(400, {"object": "error", "message": "query must be a string and documents a list of "
                                     "strings", "type": "BadRequestError", "param": None, "code": 400})
            return
        qw = set(query.lower().split())
        scored = []
        tokens = 0
        for i, d in enumerate(docs):
            dw = set(d.lower().split())
            tokens += max(1, (len(query) + len(d)) // 4)
            score = len(qw & dw) / max(1.0, (len(qw) * len(dw)) ** 0.5)
            scored.append({"index": i, "document": {"text": d}, "relevance_score": score})
        scored.sort(key=lambda r: -r["relevance_score"])
        if top_n > 0:
            scored = scored[:top_n]
        self._write_simple(200, {"id": f"rerank-mock-{next(self.state.ids)}", "model": model,
                                 "usage": {"total_tokens": tokens}, "results": scored})
        self.state.stats.completed += 1

    def _control(self, req: _Request, path: bytes) -> None:
        st = self.state
        if path == b"/mock/stats":
            self._write_simple(200, st.stats.as_dict())
        elif path == b"/mock/last":
            self._write_simple(200, st.last)
        elif path == b"/mock/reset" and req.method == b"POST":
            st.stats = MockStats(in_flight=st.stats.in_flight)
            st.ids = itertools.count(1)
            st.last = {}
            self._write_simple(200, {"ok": True})
        elif path == b"/mock/config" and req.method == b"POST":
            try:
                data = loads(bytes(req.body)) if req.body else {}
                if not isinstance(data, dict):
                    raise ValueError("config must be an object")
                st.config.update(data)
            except (ValueError, TypeError) as exc:
                self._write_simple(400, {"error": {"message": str(exc)}})
                return
            self._write_simple(200, asdict(st.config))
        elif path == b"/mock/config":
            self._write_simple(200, asdict(st.config))
        else:
            self._write_simple(404, {"error": {"message": "unknown mock control path"}})

    def _write_simple(self, status: int, obj: Any, *, close: bool = False, extra: bytes = b"") -> None:
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        payload = dumps(obj)
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s" % (
            status, _REASONS.get(status, b"Status"), len(payload), extra)
        if close or not self.keep_alive:
            tr.write(head + b"connection: close\r\n\r\n" + payload)
            tr.close()
        else:
            tr.write(head + b"\r\n" + payload)


class _Suspend:
    def __await__(self) -> Any:
        yield None


async def _suspend() -> None:
    await _Suspend()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                chars += len(m["content"])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) for p in prompt if isinstance(p, str))
    return max(1, chars // 4)


async def serve(host: str, port: int, config: MockConfig, ready: asyncio.Event | None = None) -> None:
    """Run the double until cancelled."""
    state = MockState(config)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: MockProtocol(state), host, port, backlog=2048, reuse_address=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def run(host: str = "127.0.0.1", port: int = 9100, config: MockConfig | None = None, use_uvloop: bool = True) -> None:
    cfg = config or MockConfig()
    if use_uvloop:
        try:
            import uvloop

            uvloop.run(serve(host, port, cfg))
            return
        except ImportError:  # pragma: no cover
            pass
    asyncio.run(serve(host, port, cfg))
