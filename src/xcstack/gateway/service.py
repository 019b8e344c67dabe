"""The gateway service: one request's way through the gateway, from the ASGI call to its answer.

Read body and validate (`asgi.py`, `prepare.py`), authorize the model, rate limit, admit (a global
slot, leaving the queue at once when the client hangs up), then route with failover (`failover.py`)
and answer: the whole body, or the SSE relay (`relay.py`); what the call cost is recorded by
`accounting.py`; embeddings for local models go to the inference capability (`local.py`).
Written against raw ASGI (`scope`, `receive`, `send`) for speed and so that the relay controls
backpressure and disconnects itself; `routes.py` only mounts it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from xcstack.capability import LocalEmbedder, UsageGovernor
from xcstack.errors import BadRequest, CoreCode, GatewayTimeout, NotFound, Overloaded, XCError
from xcstack.gateway import metrics
from xcstack.gateway.accounting import Accounting
from xcstack.gateway.admission import Gate, GateFull, GateTimeout
from xcstack.gateway.asgi import ClientGone, key_id, read_body, send_error, send_json
from xcstack.gateway.failover import Failover, Stopped
from xcstack.gateway.local import LocalEmbeddings
from xcstack.gateway.prepare import EMBEDDINGS, RERANK, Endpoint, Prepared, check_context, parse_object, validate
from xcstack.gateway.protocol import GatewayCode
from xcstack.gateway.ratelimit import RateLimiter
from xcstack.gateway.relay import Relay
from xcstack.gateway.rerank import Reranker, upstream_answer
from xcstack.gateway.settings import GatewaySettings
from xcstack.gateway.types import Receive, Scope, Send
from xcstack.gateway.upstream import Router, Upstream
from xcstack.gateway.watchdog import Watchdog
from xcstack.httputil import dumps
from xcstack.safety.blocked import Blocked

if TYPE_CHECKING:
    from xcstack.safety.service import SafetyService


class GatewayService:
    def __init__(self, settings: GatewaySettings, *, max_body_bytes: int = 8 * 1024 * 1024,
                 local: LocalEmbedder | None = None, default_embedding_model: str | None = None,
                 usage: UsageGovernor | None = None) -> None:
        self.settings = settings
        self.usage = usage  # quotas and the usage ledger (the usage capability), when it is on
        self.default_embedding_model = default_embedding_model  # for /v1/embeddings without `model`
        self.max_body = max_body_bytes
        self.upstreams = [Upstream(u, settings.breaker, settings.queue_timeout_s) for u in settings.upstreams]
        self.router = Router(self.upstreams)
        self.gate = Gate("global", settings.max_in_flight, settings.max_queue, settings.queue_timeout_s)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.limiter = RateLimiter(settings.rate_limit, redis_url, settings.redis_prefix)
        self.failover = Failover(self.router, settings.retry)
        self.accounting = Accounting(self.limiter)
        self.relay = Relay(self.failover, self.accounting, settings)
        self.local = LocalEmbeddings(local, self.limiter)  # the inference capability's models, when on
        self.reranker = Reranker(settings.rerank, self.router, local, self.limiter, default_embedding_model)
        self.created = int(time.time())
        self.safety: SafetyService | None = None  # content filters and labels (the safety capability)

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

    # -- request preparation --------------------------------------------------------------------
    def prepare(self, endpoint: Endpoint, raw: bytes, key: str) -> Prepared:
        return self.prepare_data(endpoint, parse_object(raw), raw, key)

    def prepare_data(self, endpoint: Endpoint, data: dict[str, Any], raw: bytes, key: str) -> Prepared:
        if endpoint is RERANK:
            return self.reranker.prepare(data, key)
        if endpoint is EMBEDDINGS and data.get("model") is None:
            data = {**data, "model": self._default_embedding_model()}
            raw = dumps(data) if raw else raw  # the upstream gets the model that was authorized
        return validate(endpoint, data, raw, key, self.settings.max_tokens_limit)

    def _default_embedding_model(self) -> str:
        """The model of an embeddings request without one: the inference capability's default embedding
        model when something here can serve it (the local embedder or an upstream), so that authorization,
        routing and the answer all see the same name; else 400 `model_required`."""
        name = self.default_embedding_model
        if name is None or not (self.local.available or self.router.has(name, True)):
            raise BadRequest("model: required (no default embedding model is served here)",
                             code=GatewayCode.MODEL_REQUIRED,
                             param="model")
        return name

    # -- ASGI entry -----------------------------------------------------------------------------
    async def handle(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        wd = Watchdog()  # armed below, just before admission
        try:
            raw = await read_body(receive, self.max_body, scope)
            # validated (strict types, non-empty input) and, for embeddings, the default model filled in
            # before anything else: authorization and routing see the model that will run
            pr = self.prepare(endpoint, raw, key_id(scope))
            method = self.reranker.local_method(pr.model) if endpoint is RERANK else None
            if method is not None:  # a local cross-encoder, or cosine of local embeddings (rerank.py)
                await self._authorize(scope, receive, pr.model)
                await self._safety_input(scope, receive, pr)
                await self._reserve(scope, pr)
                if pr.usage is not None:
                    pr.usage.upstream = "local"
                try:
                    status = await self.reranker.serve(pr, method, send, receive)
                except (XCError, ClientGone) as exc:
                    await self._settle(pr, getattr(exc, "status", 499), cancel=True)
                    raise
                await self._settle(pr, status)
                self.accounting.count(endpoint.label, pr.model, status)
                return
            if endpoint is EMBEDDINGS and not self.router.has(pr.model, True) and self.local.available:
                # not an upstream embedding model: the local one
                await self._authorize(scope, receive, pr.model)
                await self._safety_input(scope, receive, pr)
                await self._reserve(scope, pr)
                if pr.usage is not None:
                    pr.usage.upstream = "local"
                try:
                    status = await self.local.serve(pr, send, receive)
                except (XCError, ClientGone) as exc:
                    await self._settle(pr, getattr(exc, "status", 499), cancel=True)
                    raise
                await self._settle(pr, status)
                self.accounting.count(endpoint.label, "-", status)
                return
            pr.request_id = scope.get("xc.request_id")
            # permission first: a caller without it must not learn which models exist (403, never 404)
            await self._authorize(scope, receive, pr.model)
            if not self.router.has(pr.model, endpoint is EMBEDDINGS):
                raise NotFound(f"model {pr.model!r} is not served here; see GET /v1/models",
                               code=CoreCode.MODEL_NOT_FOUND, param="model")
            await self._safety_input(scope, receive, pr)
            check_context(pr, self.router.context_length(pr.model))
            await self.limiter.check(pr.key, pr.estimate)
            try:
                await self._reserve(scope, pr)  # quotas (429 quota_exceeded)
            except XCError:
                await self.limiter.refund(pr.key, pr.estimate)
                raise
            # from here on a departed client is noticed: it leaves the admission queue at once
            wd.watch_client(receive)
            try:
                await self._admit(wd)
            except (XCError, ClientGone) as exc:
                await wd.close()  # disarmed first: a late disconnect must not cancel what follows
                await self.limiter.refund(pr.key, pr.estimate)  # not served: not counted
                await self._settle(pr, getattr(exc, "status", 499), cancel=True)
                raise
        except ClientGone:
            metrics.DISCONNECTS.labels(endpoint.label).inc()
            self.accounting.count(endpoint.label, "-", 499)
            scope["xc.client_disconnected"] = True  # for outer layers: no response was sent on purpose
            return
        except XCError as err:
            self.accounting.count(endpoint.label, "-", err.status)
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
            self.accounting.count(endpoint.label, pr.model, status)
            if status == 499:
                scope["xc.client_disconnected"] = True  # for outer layers: no response was sent on purpose
            await wd.close()
            await self._settle(pr, status)

    async def _reserve(self, scope: Scope, pr: Prepared) -> None:
        """The usage capability's quota reservation for this call (none without it)."""
        if self.usage is not None:
            mt = pr.data.get("max_tokens") or pr.data.get("max_completion_tokens")
            pr.usage = await self.usage.reserve(scope, pr.endpoint.label, pr.model, pr.estimate,
                                                mt if isinstance(mt, int) else None)

    async def _settle(self, pr: Prepared, status: int, cancel: bool = False) -> None:
        """Charge the call's usage (or give back a call never served) and write its ledger record."""
        if self.usage is not None and pr.usage is not None:
            await (self.usage.cancel if cancel else self.usage.settle)(pr.usage, status)

    async def _safety_input(self, scope: Scope, receive: Receive, pr: Prepared) -> None:
        """Content safety on the input (400 `content_blocked` naming the category, or a masked body
        upstream) and the answer's label: the safety capability, when it is on (docs/safety.md)."""
        if self.safety is None:
            return
        from starlette.requests import Request

        from xcstack.security.guard import audit

        async def record(action: str, resource: str, outcome: str, detail: dict[str, Any]) -> None:
            await audit(Request(scope, receive), action, resource, outcome, detail)

        groups = tuple(getattr(scope.get("xc.principal"), "roles", ()) or ())
        rs = await self.safety.begin(key=pr.key, groups=groups, model=pr.model, route=pr.endpoint.path,
                                     request_id=scope.get("xc.request_id"), audit=record,
                                     generation=pr.endpoint.generation)
        if rs is None:
            return
        try:
            masked = await rs.check_input(pr.data)
        except Blocked as b:
            raise BadRequest(f"content blocked by policy {b.finding.policy!r}: category {b.finding.category}",
                             code=GatewayCode.CONTENT_BLOCKED, param=b.finding.field or None) from None
        if masked is not None:
            pr.data, pr.raw = masked, dumps(masked)  # what goes upstream (`prepare.upstream_body`)
        pr.safety = rs

    async def _authorize(self, scope: Scope, receive: Receive, model: str) -> None:
        """The model permission, always asked (no authorizer in the scope raises: fails closed)."""
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
                             code=CoreCode.OVERLOADED) from None
        except GateTimeout:
            metrics.rejected("global_timeout")
            raise Overloaded("timed out waiting for an in-flight slot; retry later", retry_after=1.0,
                             code=CoreCode.OVERLOADED) from None

    def _total_s(self, pr: Prepared) -> float:
        """The call's total deadline: the most patient of the model's upstreams."""
        return max(t.upstream.timeouts.total_s for t in self.router.routes[pr.model])

    # -- unary ----------------------------------------------------------------------------------
    async def complete(self, pr: Prepared, wd: Watchdog) -> tuple[int, bytes]:
        """Non-streamed call: (status, body). Raises XCError; `Stopped` on disconnect/total timeout."""
        wd.set_total(self._total_s(pr))
        try:
            opened = await self.failover.open(pr, wd)
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            raise Stopped(reason) from None
        healthy: bool | None = None
        if pr.usage is not None:
            pr.usage.upstream = opened.upstream.name
        try:
            payload = opened.first
            if opened.status < 400:
                healthy = True
                await self.accounting.unary(pr, payload, time.monotonic() - opened.sent_at)
            return opened.status, payload
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            raise Stopped(reason) from None
        finally:
            self.failover.finish(opened, healthy)

    async def _unary(self, pr: Prepared, send: Send, wd: Watchdog) -> int:
        try:
            status, payload = await self.complete(pr, wd)
            if pr.endpoint is RERANK and status < 400:
                payload = upstream_answer(pr, payload)
        except Stopped as stop:
            return await self._stopped(pr, stop.reason, send, wd)
        except XCError as err:
            wd.disarm()
            await send_error(send, err)
            return err.status
        wd.disarm()
        headers = None
        if pr.safety is not None and status < 400:  # output filters and the label (safety capability)
            try:
                payload = await pr.safety.answer(payload)
            except Blocked as b:
                refused = BadRequest(f"answer blocked by policy {b.finding.policy!r}: category "
                                     f"{b.finding.category}", code=GatewayCode.CONTENT_BLOCKED)
                await send_error(send, refused)
                return refused.status
            headers = pr.safety.headers
        await send_json(send, status, payload, headers)
        return status

    async def _stopped(self, pr: Prepared, reason: str, send: Send, wd: Watchdog) -> int:
        await wd.settle()
        if reason == "disconnect":
            metrics.DISCONNECTS.labels(pr.endpoint.label).inc()
            return 499
        wd.disarm()
        what = "the total time limit" if reason == "total" else f"a {reason} timeout"
        err = GatewayTimeout(f"the upstream call hit {what}", code=CoreCode.UPSTREAM_TIMEOUT)
        await send_error(send, err)
        return err.status

    # -- streams --------------------------------------------------------------------------------
    async def _stream(self, pr: Prepared, send: Send, wd: Watchdog) -> int:
        t0 = time.monotonic()
        wd.set_total(self._total_s(pr))
        try:
            opened = await self.failover.open(pr, wd)
        except Stopped as stop:
            return await self._stopped(pr, stop.reason, send, wd)
        except asyncio.CancelledError:
            reason = wd.take()
            if reason is None:
                raise
            return await self._stopped(pr, reason, send, wd)
        except XCError as err:
            wd.disarm()
            await send_error(send, err)
            return err.status
        if pr.usage is not None:
            pr.usage.upstream = opened.upstream.name
        if opened.status >= 400:
            self.failover.finish(opened, None)
            wd.disarm()
            await send_json(send, opened.status, opened.first)
            return opened.status
        return await self.relay.run(pr, opened, send, wd, t0)

    # -- models ---------------------------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        out = [{"id": m, "object": "model", "created": self.created, "owned_by": ",".join(owners)}
               for m, owners in self.router.models()]
        if self.local.embedder is not None:
            seen = {m["id"] for m in out}
            for name in self.local.embedder.model_names():
                if name not in seen:
                    out.append({"id": name, "object": "model", "created": self.created, "owned_by": "xcstack"})
        return out
