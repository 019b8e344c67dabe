"""The gateway service: validation, rate limits, admission, routing with failover, the unary proxy
and the SSE streaming relay. Written against raw ASGI (`scope`, `receive`, `send`) for speed and so
that the relay controls backpressure and disconnects itself; `routes.py` only mounts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import BaseModel, ValidationError

from xcstack.disconnect import CancelOnDisconnect, ClientDisconnected
from xcstack.errors import BadRequest, GatewayTimeout, NotFound, Overloaded, PayloadTooLarge, UpstreamError, XCError
from xcstack.gateway import metrics
from xcstack.gateway import protocol as p
from xcstack.gateway.admission import Gate, GateFull, GateTimeout
from xcstack.gateway.ratelimit import RateLimiter
from xcstack.gateway.settings import GatewaySettings
from xcstack.gateway.types import Receive, Scope, Send
from xcstack.gateway.upstream import Router, Target, Upstream
from xcstack.gateway.watchdog import Watchdog
from xcstack.httputil import dumps, loads, validation_error

log = logging.getLogger("xcstack.gateway")

LocalEmbedder = Callable[[str, list[str]], Awaitable[tuple[list[list[float]], dict[str, int]]]]

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_CT = (b"content-type", b"application/json")
_DONE = b"data: [DONE]\n\n"
_MAX_UNARY_BYTES = 64 * 1024 * 1024  # a non-streamed answer is buffered whole
_SEND_SLICE = 16 * 1024


class ClientGone(Exception):
    """The client disconnected (while we read its body)."""


@dataclass(slots=True)
class Endpoint:
    path: str  # the public path, e.g. /v1/chat/completions
    upstream_path: str  # appended to the upstream base_url (which ends in /v1)
    model: type[BaseModel]
    generation: bool  # has max_tokens / stream
    label: str


CHAT = Endpoint("/v1/chat/completions", "/chat/completions", p.ChatCompletionRequest, True, "chat")
COMPLETIONS = Endpoint("/v1/completions", "/completions", p.CompletionRequest, True, "completions")
EMBEDDINGS = Endpoint("/v1/embeddings", "/embeddings", p.EmbeddingRequest, False, "embeddings")
ENDPOINTS = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}


@dataclass(slots=True)
class Prepared:
    """A validated request, ready to route."""

    endpoint: Endpoint
    data: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    client_usage: bool
    key: str
    estimate: int
    request_id: str | None = None


@dataclass(slots=True)
class Opened:
    """An upstream answer that is being relayed: the slot is held until `finish`."""

    upstream: Upstream
    resp: aiohttp.ClientResponse | None
    status: int
    first: bytes  # streams: the first chunk; unary: the whole body
    sent_at: float = 0.0  # monotonic time the request went to this upstream


class UpstreamFailed(Exception):
    def __init__(self, error: XCError) -> None:
        super().__init__(error.message)
        self.error = error


def key_id(scope: Scope) -> str:
    """The API key identity for rate limits and metrics: the security principal's id when the
    security middleware set one, else a hash of the bearer token, else 'anonymous'."""
    principal = scope.get("xc.principal")
    if principal is not None:
        return str(getattr(principal, "id", principal))
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            token = value[7:] if value[:7].lower() == b"bearer " else value
            return "k:" + hashlib.sha256(token.strip()).hexdigest()[:16]
    return "anonymous"


async def read_body(receive: Receive, limit: int, scope: Scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body is {int(value)} bytes; the limit is {limit}", code=p.PAYLOAD_TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        body = msg.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", code=p.PAYLOAD_TOO_LARGE)
            chunks.append(body)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(send: Send, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = [_JSON_CT, (b"content-length", str(len(payload)).encode())]
    if headers:
        hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(send: Send, err: XCError) -> None:
    await send_json(send, err.status, dumps(err.body()), err.headers)


def sse_error(err: XCError) -> bytes:
    return b"data: " + dumps(err.body()) + b"\n\n" + _DONE


class GatewayService:
    def __init__(self, settings: GatewaySettings, *, max_body_bytes: int = 8 * 1024 * 1024,
                 services: dict[str, Any] | None = None, default_embedding_model: str | None = None) -> None:
        self.settings = settings
        self.default_embedding_model = default_embedding_model  # for /v1/embeddings without `model`
        self.max_body = max_body_bytes
        self.services = services if services is not None else {}
        self.upstreams = [Upstream(u, settings.breaker, settings.queue_timeout_s) for u in settings.upstreams]
        self.router = Router(self.upstreams)
        self.gate = Gate("global", settings.max_in_flight, settings.max_queue, settings.queue_timeout_s)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.limiter = RateLimiter(settings.rate_limit, redis_url, settings.redis_prefix)
        self.retry = settings.retry
        self.created = int(time.time())
        self._m_requests: dict[tuple[str, str, int], Any] = {}
        self._m_ttft: dict[str, Any] = {}
        self._m_tokens: dict[tuple[str, str], tuple[Any, Any]] = {}

    async def start(self) -> None:
        for up in self.upstreams:
            await up.start()

    async def stop(self) -> None:
        for up in self.upstreams:
            await up.stop()
        await self.limiter.close()

    @property
    def in_flight(self) -> int:
        return self.gate.active

    def upstream_models(self) -> set[str]:
        return set(self.router.routes)

    # -- metrics helpers ------------------------------------------------------------------------
    def _count(self, ep: str, model: str, status: int) -> None:
        k = (ep, model, status)
        c = self._m_requests.get(k)
        if c is None:
            if len(self._m_requests) > 10_000:
                self._m_requests.clear()
            c = self._m_requests[k] = metrics.REQUESTS.labels(ep, model, str(status))
        c.inc()

    # -- request preparation --------------------------------------------------------------------
    def prepare(self, endpoint: Endpoint, raw: bytes, key: str) -> Prepared:
        return self.prepare_data(endpoint, self._parse(raw), raw, key)

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        if not raw:
            raise BadRequest("request body is empty; JSON expected", code=p.INVALID_JSON)
        try:
            data = loads(raw)
        except ValueError as exc:
            raise BadRequest(f"malformed JSON: {exc}", code=p.INVALID_JSON) from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object", code=p.INVALID_JSON)
        return data

    def prepare_data(self, endpoint: Endpoint, data: dict[str, Any], raw: bytes, key: str) -> Prepared:
        if endpoint is EMBEDDINGS and data.get("model") is None:
            data = {**data, "model": self._default_embedding_model()}
            raw = dumps(data) if raw else raw  # the upstream gets the model that was authorized
        try:
            req: Any = endpoint.model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if endpoint is EMBEDDINGS:
            p.check_embedding_input(req.input)
        stream = False
        client_usage = False
        if endpoint.generation:
            limit = self.settings.max_tokens_limit
            for field in ("max_tokens", "max_completion_tokens"):
                value = getattr(req, field, None)
                if value is not None and value > limit:
                    raise BadRequest(f"{field} is {value}; the largest accepted is {limit}",
                                     code=p.MAX_TOKENS_TOO_LARGE, param=field)
            stream = bool(req.stream)
            client_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(endpoint, data, raw, req.model, stream, client_usage, key, p.estimate_prompt_tokens(data))

    def _default_embedding_model(self) -> str:
        """The model of an embeddings request without one: the inference capability's default embedding
        model when something here can serve it (the local embedder or an upstream), so that authorization,
        routing and the answer all see the same name; else 400 `model_required`."""
        name = self.default_embedding_model
        local = self.services.get("local_embeddings") or self.services.get("local_embedder")
        if name is None or not (local is not None or self.router.has(name, True)):
            raise BadRequest("model: required (no default embedding model is served here)", code=p.MODEL_REQUIRED,
                             param="model")
        return name

    def body_for(self, pr: Prepared, target: Target) -> bytes:
        """The body sent upstream: the client's bytes untouched unless the model name changes
        (alias) or, for streams, usage must be requested (for metrics and token limits)."""
        rewrite_model = target.model != pr.model
        want_usage = pr.stream and not pr.client_usage
        if not rewrite_model and not want_usage:
            return pr.raw
        data = dict(pr.data)
        if rewrite_model:
            data["model"] = target.model
        if want_usage:
            opts = data.get("stream_options")
            data["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        return dumps(data)

    # -- ASGI entry -----------------------------------------------------------------------------
    async def handle(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        wd = Watchdog()  # armed below, just before admission
        try:
            raw = await read_body(receive, self.max_body, scope)
            key = key_id(scope)
            # validated (strict types, non-empty input) and, for embeddings, the default model filled in
            # before anything else: authorization and routing see the model that will run
            pr = self.prepare(endpoint, raw, key)
            if endpoint is EMBEDDINGS and not self.router.has(pr.model, True):
                local = self.services.get("local_embeddings") or self.services.get("local_embedder")
                if local is not None:  # not an upstream embedding model: the local one
                    await self._authorize(scope, receive, pr.model)
                    status = await self._local_embeddings(pr.data, key, send, receive)
                    self._count(endpoint.label, "-", status)
                    return
            pr.request_id = scope.get("xc.request_id")
            # permission first: a caller without it must not learn which models exist (403, never 404)
            await self._authorize(scope, receive, pr.model)
            if not self.router.has(pr.model, endpoint is EMBEDDINGS):
                raise NotFound(f"model {pr.model!r} is not served here; see GET /v1/models",
                               code=p.MODEL_NOT_FOUND, param="model")
            await self.limiter.check(pr.key, pr.estimate)
            # from here on a departed client is noticed: it leaves the admission queue at once
            wd.watch_client(receive)
            try:
                await self._admit(wd)
            except (XCError, ClientGone):
                await wd.close()  # disarmed first: a late disconnect must not cancel what follows
                await self.limiter.refund(pr.key, pr.estimate)  # not served: not counted
                raise
        except ClientGone:
            metrics.DISCONNECTS.labels(endpoint.label).inc()
            self._count(endpoint.label, "-", 499)
            scope["xc.client_disconnected"] = True  # for outer layers: no response was sent on purpose
            return
        except XCError as err:
            self._count(endpoint.label, "-", err.status)
            await send_error(send, err)
            return
        metrics.IN_FLIGHT.inc()
        status = 500
        try:
            if pr.stream:
                status = await self._stream(pr, send, wd)
            else:
                status = await self._unary(pr, send, wd)
        finally:
            self.gate.release()  # first, and without awaiting: nothing can skip it
            metrics.IN_FLIGHT.dec()
            self._count(endpoint.label, pr.model, status)
            if status == 499:
                scope["xc.client_disconnected"] = True  # for outer layers: no response was sent on purpose
            await wd.close()

    async def _authorize(self, scope: Scope, receive: Receive, model: str) -> None:
        if scope.get("xc.authorizer") is None:
            return
        from starlette.requests import Request

        from xcstack.security.guard import authorize

        await authorize(Request(scope, receive), f"model:{model}", "invoke")

    async def _admit(self, wd: Watchdog) -> None:
        """A global slot. While queued for one, the watchdog watches the client: one that hangs up leaves
        the queue at once (ClientGone) instead of holding its place, and never reaches the upstream."""
        if self.gate.try_acquire():
            return
        try:
            await self.gate.acquire()
            try:  # let a disconnect that raced the grant be delivered before the upstream call starts
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                self.gate.release()
                raise
        except asyncio.CancelledError:
            if wd.take() is None:
                raise  # not ours (server shutdown)
            raise ClientGone() from None
        except GateFull:
            metrics.rejected("global_full")
            raise Overloaded("the gateway is at its in-flight limit; retry later", retry_after=1.0,
                             code=p.OVERLOADED) from None
        except GateTimeout:
            metrics.rejected("global_timeout")
            raise Overloaded("timed out waiting for an in-flight slot; retry later", retry_after=1.0,
                             code=p.OVERLOADED) from None

    # -- routing + failover ---------------------------------------------------------------------
    async def open(self, pr: Prepared, wd: Watchdog) -> Opened:
        """Send the request to the best candidate; on connect error, timeout, 5xx or 429 before
        the first byte, retry on the next one (bounded, jittered backoff). Returns with the
        upstream's slot held (release with `finish`)."""
        candidates = self.router.candidates(pr.model, pr.endpoint is EMBEDDINGS)
        last: XCError | None = None
        retry_after = 0.0
        tried = 0
        for target in candidates:
            if tried >= self.retry.max_attempts:
                break
            up = target.upstream
            if not up.breaker.begin():
                up.outcome("breaker_open")
                retry_after = max(retry_after, up.breaker.retry_after())
                if last is None:
                    last = Overloaded(f"upstream {up.name} is unavailable (circuit open)", code=p.UPSTREAM_UNAVAILABLE)
                continue
            if tried:
                base = self.retry.backoff_base_s * (2 ** (tried - 1))
                await asyncio.sleep(min(self.retry.backoff_max_s, base) * (0.5 + random.random()))
            tried += 1
            try:
                await up.gate.acquire()
            except (GateFull, GateTimeout):
                up.breaker.neutral()
                up.outcome("gate_full")
                metrics.rejected("upstream_full")
                last = Overloaded(f"upstream {up.name} is at its concurrency limit", code=p.OVERLOADED)
                continue
            up.m_in_flight.inc()
            opened: Opened | None = None
            try:
                opened = await self._attempt(pr, target, wd)
                return opened
            except UpstreamFailed as exc:
                last = exc.error
                if "Retry-After" in exc.error.headers:
                    retry_after = max(retry_after, float(exc.error.headers["Retry-After"]))
                continue
            finally:
                if opened is None:
                    up.gate.release()
                    up.m_in_flight.dec()
        if last is None:
            last = Overloaded(f"no upstream available for model {pr.model!r}", code=p.UPSTREAM_UNAVAILABLE)
        if isinstance(last, Overloaded):
            last.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        raise last

    async def _attempt(self, pr: Prepared, target: Target, wd: Watchdog) -> Opened:
        up = target.upstream
        assert up.session is not None
        tmo = up.timeouts
        resp: aiohttp.ClientResponse | None = None
        ok = False
        try:
            wd.set_phase(tmo.ttfb_s, "ttfb")
            headers = up.headers if pr.request_id is None else {**up.headers, "X-Request-Id": pr.request_id}
            sent_at = time.monotonic()
            resp = await up.session.post(up.url(pr.endpoint.upstream_path), data=self.body_for(pr, target),
                                         headers=headers)
            status = resp.status
            if status >= 500 or status == 429:
                body = await resp.content.read(64 * 1024)
                if status == 429:
                    up.breaker.neutral()
                    up.outcome("429")
                    ra = _retry_after_header(resp.headers.get("Retry-After"))
                    raise UpstreamFailed(Overloaded(f"upstream {up.name} is rate limiting (429)",
                                                    code=p.UPSTREAM_UNAVAILABLE, retry_after=ra))
                up.breaker.failure()
                up.outcome("5xx")
                raise UpstreamFailed(UpstreamError(
                    f"upstream {up.name} answered {status}: {_snippet(body)}", code=p.UPSTREAM_ERROR))
            if status >= 400:
                # The upstream refused the request itself: not retriable, relay its status and message in
                # the gateway's error model (vLLM, TGI and OpenAI each shape theirs differently)
                body = rejection_body(up.name, status, await resp.content.read(64 * 1024))
                up.breaker.neutral()
                up.outcome("4xx")
                wd.clear_phase()
                ok = True
                return Opened(up, resp, status, body, sent_at)
            if pr.stream:
                first = await resp.content.readany()
                if not first:
                    up.breaker.failure()
                    up.outcome("empty")
                    raise UpstreamFailed(UpstreamError(f"upstream {up.name} closed the stream before any data",
                                                       code=p.UPSTREAM_ERROR))
            else:
                wd.clear_phase()
                if resp.content_length is not None and resp.content_length > _MAX_UNARY_BYTES:
                    up.breaker.neutral()
                    raise UpstreamFailed(UpstreamError(f"upstream {up.name} answer is too large",
                                                       code=p.UPSTREAM_ERROR))
                if resp.content_length is not None:
                    first = await resp.read()
                else:  # chunked: read with a cap
                    parts: list[bytes] = []
                    size = 0
                    while chunk := await resp.content.readany():
                        size += len(chunk)
                        if size > _MAX_UNARY_BYTES:
                            up.breaker.neutral()
                            raise UpstreamFailed(UpstreamError(f"upstream {up.name} answer is too large",
                                                               code=p.UPSTREAM_ERROR))
                        parts.append(chunk)
                    first = b"".join(parts)
            ok = True
            return Opened(up, resp, status, first, sent_at)
        except (aiohttp.ClientError, OSError) as exc:
            up.breaker.failure()
            up.outcome("connect_error" if isinstance(exc, aiohttp.ClientConnectionError | OSError) else "error")
            raise UpstreamFailed(Overloaded(f"upstream {up.name} failed: {type(exc).__name__}: {exc}"[:300],
                                            code=p.UPSTREAM_UNAVAILABLE)) from None
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            if reason == "ttfb":
                wd.reset()
                up.breaker.failure()
                up.outcome("ttfb_timeout")
                raise UpstreamFailed(GatewayTimeout(
                    f"upstream {up.name} sent nothing within {tmo.ttfb_s}s", code=p.UPSTREAM_TIMEOUT)) from None
            up.breaker.neutral()
            wd.reason = reason  # total timeout or disconnect: the caller handles it
            raise _Stop(reason) from None
        finally:
            if not ok:
                wd.clear_phase()
                if resp is not None:
                    resp.close()

    def finish(self, opened: Opened, healthy: bool | None) -> None:
        up = opened.upstream
        if opened.resp is not None:
            if healthy is True:
                opened.resp.release()  # back to the keep-alive pool (closed if not at EOF)
            else:
                opened.resp.close()
        if healthy is True:
            up.breaker.success()
            up.outcome("ok")
        elif healthy is False:
            up.breaker.failure()
            up.outcome("failed_mid_stream")
        else:
            up.breaker.neutral()
        up.gate.release()
        up.m_in_flight.dec()

    # -- unary ----------------------------------------------------------------------------------
    async def complete(self, pr: Prepared, wd: Watchdog) -> tuple[int, bytes]:
        """Non-streamed call: (status, body). Raises XCError; `_Stop` on disconnect/total timeout."""
        wd.set_total(max(t.upstream.timeouts.total_s for t in self.router.routes[pr.model]))
        try:
            opened = await self.open(pr, wd)
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            raise _Stop(reason) from None
        healthy: bool | None = None
        try:
            payload = opened.first
            if opened.status < 400:
                healthy = True
                await self._charge_unary(pr, payload, time.monotonic() - opened.sent_at)
            return opened.status, payload
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            raise _Stop(reason) from None
        finally:
            self.finish(opened, healthy)

    async def _charge_unary(self, pr: Prepared, payload: bytes, seconds: float) -> None:
        """Usage of a non-streamed answer; its generation time is the whole upstream call (no first token
        to start from), so per-key tokens/s = completion tokens / generation seconds holds for both."""
        if b'"usage"' not in payload:
            return
        try:
            usage = loads(payload).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self._generation(pr, usage, seconds)
            await self._account(pr, usage)

    @staticmethod
    def _generation(pr: Prepared, usage: dict[str, Any], seconds: float) -> None:
        ct = usage.get("completion_tokens")
        if isinstance(ct, int) and ct > 0 and seconds > 0:
            metrics.TOKENS_PER_S.labels(pr.model).observe(ct / seconds)
            metrics.KEY_GENERATION.labels(pr.key, pr.model).observe(seconds)

    async def _account(self, pr: Prepared, usage: dict[str, Any]) -> None:
        pt = usage.get("prompt_tokens") or 0
        ct = usage.get("completion_tokens") or 0
        if isinstance(pt, int) and isinstance(ct, int):
            k = (pr.key, pr.model)
            children = self._m_tokens.get(k)
            if children is None:
                if len(self._m_tokens) > 10_000:
                    self._m_tokens.clear()
                children = self._m_tokens[k] = (metrics.TOKENS.labels(pr.key, pr.model, "prompt"),
                                                metrics.TOKENS.labels(pr.key, pr.model, "completion"))
            children[0].inc(pt)
            if ct:
                children[1].inc(ct)
            total = usage.get("total_tokens")
            actual = total if isinstance(total, int) else pt + ct
            await self.limiter.charge(pr.key, actual - pr.estimate)

    async def _unary(self, pr: Prepared, send: Send, wd: Watchdog) -> int:
        try:
            status, payload = await self.complete(pr, wd)
        except _Stop as stop:
            return await self._stopped(pr, stop.reason, send, wd)
        except XCError as err:
            wd.armed = False
            await send_error(send, err)
            return err.status
        wd.armed = False
        await send_json(send, status, payload)
        return status

    async def _stopped(self, pr: Prepared, reason: str, send: Send, wd: Watchdog) -> int:
        await wd.settle()
        if reason == "disconnect":
            metrics.DISCONNECTS.labels(pr.endpoint.label).inc()
            return 499
        wd.armed = False
        what = "the total time limit" if reason == "total" else f"a {reason} timeout"
        err = GatewayTimeout(f"the upstream call hit {what}", code=p.UPSTREAM_TIMEOUT)
        await send_error(send, err)
        return err.status

    # -- streaming relay ------------------------------------------------------------------------
    async def _stream(self, pr: Prepared, send: Send, wd: Watchdog) -> int:
        t0 = time.monotonic()
        wd.set_total(max(t.upstream.timeouts.total_s for t in self.router.routes[pr.model]))
        try:
            opened = await self.open(pr, wd)
        except _Stop as stop:
            return await self._stopped(pr, stop.reason, send, wd)
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            return await self._stopped(pr, reason, send, wd)
        except XCError as err:
            wd.armed = False
            await send_error(send, err)
            return err.status
        if opened.status >= 400:
            self.finish(opened, None)
            wd.armed = False
            await send_json(send, opened.status, opened.first)
            return opened.status
        return await self._relay(pr, opened, send, wd, t0)

    async def _relay(self, pr: Prepared, opened: Opened, send: Send, wd: Watchdog, t0: float) -> int:
        up = opened.upstream
        resp = opened.resp
        assert resp is not None
        t_first = time.monotonic()
        ttft = self._m_ttft.get(pr.model)
        if ttft is None:
            ttft = self._m_ttft[pr.model] = metrics.TTFT.labels(pr.model)
        ttft.observe(t_first - t0)
        metrics.KEY_TTFT.labels(pr.key, pr.model).observe(t_first - t0)
        wd.set_phase(up.timeouts.idle_s, "idle")
        max_event = self.settings.max_sse_event_bytes
        state = _RelayState(pr.client_usage)
        healthy: bool | None = None
        error: XCError | None = None
        status = 200
        content = resp.content
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            buf = opened.first
            while True:
                cut = _last_event_end(buf)
                if cut:
                    out = state.process(buf[:cut])
                    buf = buf[cut:]
                    if len(out) <= _SEND_SLICE:
                        if out:
                            await send({"type": "http.response.body", "body": out, "more_body": True})
                    else:  # slices: the server waits for the client between them (bounded buffer)
                        for i in range(0, len(out), _SEND_SLICE):
                            await send({"type": "http.response.body", "body": out[i:i + _SEND_SLICE],
                                        "more_body": True})
                            if wd.reason is not None:
                                break
                elif len(buf) > max_event:
                    error = UpstreamError(f"upstream sent an SSE event over {max_event} bytes",
                                          code=p.STREAM_INTERRUPTED)
                    healthy = False
                    break
                if wd.reason is not None:  # client gone (or deadline) while data kept flowing
                    break
                if state.done:
                    healthy = True
                    break
                wd.waiting_upstream()  # the idle gap counts only while waiting for the upstream
                chunk = await content.readany()
                wd.busy = True  # relaying (maybe to a slow client): the idle deadline does not apply
                if not chunk:
                    if buf.strip():
                        out = state.process(buf + b"\n\n")
                        if out:
                            await send({"type": "http.response.body", "body": out, "more_body": True})
                    if state.done:
                        healthy = True
                    else:
                        healthy = False
                        error = UpstreamError(f"upstream {up.name} ended the stream without [DONE]",
                                              code=p.STREAM_INTERRUPTED)
                    break
                buf = buf + chunk if buf else chunk
        except asyncio.CancelledError:
            if wd.take() is None:
                self.finish(opened, None)
                raise
        except (aiohttp.ClientError, OSError) as exc:
            healthy = False
            error = UpstreamError(f"upstream {up.name} failed mid-stream: {type(exc).__name__}",
                                  code=p.STREAM_INTERRUPTED)
        reason = wd.reason
        if reason is not None:
            await wd.settle()
        if reason == "disconnect":
            self.finish(opened, None)  # closes the upstream connection now
            metrics.DISCONNECTS.labels(pr.endpoint.label).inc()
            status = 499
        else:
            if reason in ("idle", "total"):
                healthy = False if reason == "idle" else None
                what = f"no data for {up.timeouts.idle_s}s" if reason == "idle" else "total time limit reached"
                error = GatewayTimeout(f"upstream {up.name}: {what}", code=p.UPSTREAM_TIMEOUT)
            self.finish(opened, healthy)
            wd.armed = False
            if error is not None:
                metrics.STREAM_ERRORS.labels(error.code).inc()
                tail = sse_error(error)
                status = 200 if healthy is None else 502
            else:
                tail = b""
            try:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            except OSError:
                pass
        # usage accounting (also for streams the client left: the upstream did the work so far)
        t_end = time.monotonic()
        usage = state.usage
        if usage is None and state.events:
            usage = {"prompt_tokens": pr.estimate, "completion_tokens": state.events, "total_tokens": pr.estimate
                     + state.events}
        if usage is not None:
            self._generation(pr, usage, t_end - t_first)
            await self._account(pr, usage)
        return status

    # -- embeddings for local models ------------------------------------------------------------
    async def _local_embeddings(self, data: dict[str, Any], key: str, send: Send, receive: Receive) -> int:
        """/v1/embeddings for a model no upstream serves: the inference capability's
        `local_embeddings` (whole exchange: body -> response dict) or `local_embedder`. A client that
        leaves while its rows wait for a batch has them withdrawn (and its estimate refunded)."""
        estimate = p.estimate_prompt_tokens(data)
        await self.limiter.check(key, estimate)
        try:
            async with CancelOnDisconnect(receive):
                out = await self._embed_locally(data, key)
        except ClientDisconnected:
            await self.limiter.refund(key, estimate)  # not served: not counted
            raise ClientGone() from None
        spent = out.get("usage") if isinstance(out, dict) else None
        if isinstance(spent, dict) and isinstance(spent.get("total_tokens"), int):
            await self.limiter.charge(key, spent["total_tokens"] - estimate)
        await send_json(send, 200, dumps(out))
        return 200

    async def _embed_locally(self, data: dict[str, Any], key: str) -> Any:
        exchange = self.services.get("local_embeddings")
        if exchange is not None:
            out = await exchange(data)
        else:
            embedder: LocalEmbedder = self.services["local_embedder"]
            req = self.prepare_data(EMBEDDINGS, data, b"", key)
            raw = data["input"]
            if isinstance(raw, str):
                inputs = [raw]
            elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
                inputs = list(raw)
            else:
                raise BadRequest("local models take input as a string or a list of strings",
                                 code=p.INVALID_PARAMETER, param="input")
            vectors, usage = await embedder(req.model, inputs)
            rows = [v.tolist() if hasattr(v, "tolist") else v for v in vectors]
            out = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                              for i, v in enumerate(rows)], "model": req.model, "usage": usage}
        return out

    # -- models ---------------------------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        out = [{"id": m, "object": "model", "created": self.created, "owned_by": ",".join(owners)}
               for m, owners in self.router.models()]
        local = self.services.get("local_models")
        if callable(local):
            seen = {m["id"] for m in out}
            for name in local():
                if name not in seen:
                    out.append({"id": name, "object": "model", "created": self.created, "owned_by": "xcstack"})
        return out


class _Stop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RelayState:
    """Per-stream bookkeeping over complete SSE events: [DONE], usage, event count, and dropping
    the usage-only chunk the gateway asked for when the client did not."""

    __slots__ = ("client_usage", "done", "events", "usage")

    def __init__(self, client_usage: bool) -> None:
        self.client_usage = client_usage
        self.done = False
        self.events = 0
        self.usage: dict[str, Any] | None = None

    def process(self, segment: bytes) -> bytes:
        self.events += segment.count(b"data:")
        if b"[DONE]" in segment and _DONE.strip() in segment:
            self.done = True
            self.events -= 1
        if b'"usage"' not in segment or (b'"usage":{' not in segment and b'"usage": {' not in segment):
            return segment
        out: list[bytes] = []
        for event in _split_events(segment):
            if b'"usage"' in event:
                payload = _event_data(event)
                try:
                    obj = loads(payload) if payload else None
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]
                    if not self.client_usage and not obj.get("choices"):
                        self.events -= 1
                        continue
            out.append(event)
        return b"".join(out)


def _last_event_end(buf: bytes) -> int:
    i = buf.rfind(b"\n\n")
    j = buf.rfind(b"\r\n\r\n")
    if i < 0 and j < 0:
        return 0
    return max(i + 2 if i >= 0 else 0, j + 4 if j >= 0 else 0)


def _split_events(segment: bytes) -> list[bytes]:
    parts = segment.replace(b"\r\n", b"\n").split(b"\n\n")
    return [part + b"\n\n" for part in parts if part.strip()]


def _event_data(event: bytes) -> bytes:
    lines = [ln[5:].lstrip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines)


def rejection_body(upstream: str, status: int, body: bytes) -> bytes:
    """An upstream's own 4xx answer as `{"error": {type, code, message, param}}`: OpenAI-style bodies keep
    their message, type and param; vLLM's flat `{"object": "error", "message", "type"}` and plain text too."""
    try:
        raw = loads(body)
    except ValueError:
        raw = None
    inner = raw.get("error") if isinstance(raw, dict) else None
    src = inner if isinstance(inner, dict) else raw if isinstance(raw, dict) else {}
    message = src.get("message") if isinstance(src.get("message"), str) else (
        inner if isinstance(inner, str) else _snippet(body) or f"upstream {upstream} answered {status}")
    etype = src.get("type")
    err: dict[str, Any] = {"type": etype[:64] if isinstance(etype, str) else "invalid_request_error", "code": p.UPSTREAM_REJECTED, "message": str(message)[:4096]}
    param = src.get("param")
    if isinstance(param, str):
        err["param"] = param[:256]
    return dumps({"error": err})


def _snippet(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace").replace("\n", " ")


def _retry_after_header(value: str | None) -> float:
    try:
        return max(1.0, min(3600.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0
