"""Upstreams and routing: model name → candidate upstreams, least-in-flight weighted order,
per-upstream concurrency gate and circuit breaker, one aiohttp keep-alive pool per upstream."""

from __future__ import annotations

import logging
import random
import socket
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp

from xcstack.config import ConfigError
from xcstack.gateway import metrics
from xcstack.gateway.admission import Breaker, Gate
from xcstack.gateway.settings import BreakerSettings, UpstreamSettings
from xcstack.observability.metrics import Children
from xcstack.security.secrets import SecretStore, is_ref, resolve_setting

log = logging.getLogger("xcstack.gateway")

STALE_RETRIES = 3  # pooled connections found closed under one request before the last try


class Upstream:
    def __init__(self, cfg: UpstreamSettings, breaker: BreakerSettings, queue_timeout_s: float) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.base_url = cfg.base_url
        self.weight = cfg.weight
        self.timeouts = cfg.timeouts
        self.gate = Gate(f"upstream:{cfg.name}", cfg.max_concurrency, cfg.max_queue, queue_timeout_s)
        self.breaker = Breaker(breaker.failure_threshold, breaker.open_s)
        self.headers: dict[str, str] = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        # `api_key = "secret:NAME"` is resolved at start (`resolve_api_key`); the reference itself is never sent
        self.api_key_ref: str | None = None
        if cfg.api_key is not None:
            key = cfg.api_key.get_secret_value()
            if is_ref(key):
                self.api_key_ref = key
            else:
                self.headers["Authorization"] = f"Bearer {key}"
        self.session: aiohttp.ClientSession | None = None
        self.m_in_flight = metrics.UPSTREAM_IN_FLIGHT.labels(cfg.name)
        self.m_breaker = metrics.BREAKER_STATE.labels(cfg.name)
        self._m_outcome = Children(metrics.UPSTREAM_ATTEMPTS)

    def outcome(self, what: str) -> None:
        self._m_outcome(self.name, what).inc()
        self.m_breaker.set(self.breaker.state)

    def url(self, path: str) -> str:
        # path is the OpenAI path after /v1 (e.g. "/chat/completions"); base_url ends in /v1
        return self.base_url + path

    @property
    def load(self) -> float:
        return (self.gate.active + self.gate.waiting + 1) / self.weight

    async def resolve_api_key(self, secrets: SecretStore | None, key: str) -> None:
        """`api_key = "secret:NAME"`: the stored value goes into the Authorization header (the only
        copy this object keeps); ConfigError naming `key` when it cannot be resolved."""
        if self.api_key_ref is not None:
            value = await resolve_setting(secrets, self.api_key_ref, key)
            self.headers["Authorization"] = f"Bearer {value}"
            log.info("%s: taken from secret %r", key, self.api_key_ref[len("secret:"):])

    async def start(self) -> None:
        if self.api_key_ref is not None and "Authorization" not in self.headers:
            raise ConfigError(f"gateway upstream {self.name!r}: api_key {self.api_key_ref!r} was not resolved "
                              "(the gateway capability resolves it at start, from the security capability's "
                              "secret store)")
        if self.session is None:
            conn = _PoolConnector(
                limit=self.cfg.max_concurrency, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300,
                socket_factory=_socket_factory(self.cfg.recv_buffer_bytes) if self.cfg.recv_buffer_bytes else None,
            )
            self.session = aiohttp.ClientSession(
                connector=conn,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s,
                                              connect=self.timeouts.connect_s + self.timeouts.ttfb_s),
                auto_decompress=False,
                read_bufsize=2**14,
                skip_auto_headers=("User-Agent",),
            )

    async def post(self, url: str, data: Any, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST on the keep-alive pool; again when a POOLED connection was closed under the request before
        any answer byte (ServerDisconnectedError / ClientOSError from the request itself). That is the idle
        keep-alive race: llama.cpp's server (cpp-httplib) closes a connection idle for 5 s, and a request
        written as the close happens fails though the server never answered it. A failed connection leaves
        the pool, so this ends on a fresh one; a fresh connection failing is not retried (that upstream is
        down, or it dropped this very request)."""
        assert self.session is not None
        for _ in range(STALE_RETRIES):
            reuse = _Reuse()
            token = _REUSE.set(reuse)
            try:
                return await self.session.post(url, data=data, headers=headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if not reuse.reused or isinstance(exc, aiohttp.ClientConnectorError):
                    raise
                log.debug("upstream %s: pooled connection closed under the request (%s: %s); retrying",
                          self.name, type(exc).__name__, exc)
                self.outcome("stale_connection_retried")
            finally:
                _REUSE.reset(token)
        return await self.session.post(url, data=data, headers=headers)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class _Reuse:
    """Per-request note: set when the connection came from the keep-alive pool."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


#: the `_Reuse` of the request `Upstream.post` is sending (the connector runs in the caller's task)
_REUSE: ContextVar[_Reuse | None] = ContextVar("xc_upstream_reuse", default=None)


class _PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that tells `Upstream.post` whether a request's connection was used before (a
    pooled keep-alive connection) or is fresh. An aiohttp TraceConfig could tell it too, but tracing
    costs every request its signal calls (~40-70 us of CPU per request measured on the 2-core bench
    machine); this costs a weak-set look-up."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()  # protocols handed out before

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        proto = conn.protocol
        if proto is not None:
            reuse = _REUSE.get()
            if reuse is not None:
                reuse.reused = proto in self._used
            self._used.add(proto)
        return conn


def _socket_factory(rcvbuf: int) -> Callable[[Any], socket.socket]:
    """Sockets with a fixed receive buffer: bounds how much one upstream read can deliver (and so
    the memory a stream to a slow client holds) instead of letting the kernel grow it to megabytes."""

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family=family, type=type_, proto=proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        return sock

    return make


@dataclass(frozen=True)
class Target:
    upstream: Upstream
    model: str  # the name sent to the upstream


class Router:
    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self.routes: dict[str, list[Target]] = {}
        for up in upstreams:
            for m in up.cfg.models:
                self.routes.setdefault(m, []).append(Target(up, m))
            for alias, target in up.cfg.aliases.items():
                self.routes.setdefault(alias, []).append(Target(up, target))
        # /v1/embeddings goes only to upstreams that allow it (`embeddings = true`)
        self.embedding_routes = {m: [t for t in ts if t.upstream.cfg.embeddings] for m, ts in self.routes.items()}
        self.embedding_routes = {m: ts for m, ts in self.embedding_routes.items() if ts}

    def has(self, model: str, embeddings: bool = False) -> bool:
        return model in (self.embedding_routes if embeddings else self.routes)

    def candidates(self, model: str, embeddings: bool = False) -> list[Target]:
        """Candidates in the order to try: available (breaker) first, least weighted load first,
        ties broken at random; upstreams whose breaker is open come last (they are skipped unless
        their open time has passed)."""
        targets = (self.embedding_routes if embeddings else self.routes).get(model)
        if not targets:
            return []
        if len(targets) == 1:
            return list(targets)
        rnd = random.random
        return sorted(targets, key=lambda t: (not t.upstream.breaker.available(), t.upstream.load, rnd()))

    def context_length(self, model: str) -> int | None:
        """The smallest context the model's upstreams declare (None: none does)."""
        known = [t.upstream.cfg.context_length for t in self.routes.get(model, ()) if t.upstream.cfg.context_length]
        return min(known) if known else None

    def models(self) -> list[tuple[str, list[str]]]:
        return [(m, [t.upstream.name for t in ts]) for m, ts in self.routes.items()]

    def health(self) -> tuple[bool, str]:
        if not self.routes:
            return True, "no upstreams configured"
        down = [m for m, ts in self.routes.items() if not any(t.upstream.breaker.available() for t in ts)]
        opened = [u.name for u in self.upstreams if u.breaker.state != Breaker.CLOSED]
        if down:
            return False, f"no available upstream for models {sorted(down)[:10]}; breakers open: {opened}"
        return True, f"{len(self.upstreams)} upstreams" + (f", breakers open: {opened}" if opened else "")
