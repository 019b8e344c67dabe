"""The gateway capability: OpenAI-compatible proxy, admission control, rate limits, streaming
relay, async jobs. Listed in `capability.REGISTRY`.

Services used (`WIRING`; both are created before this capability when they are in the app):
- `secrets` (the security capability's SecretStore, started before this one) resolves
  `api_key = "secret:NAME"` at start; a reference without it, or to a missing secret, fails start-up
  with the key (`gateway.upstreams[0].api_key: secret 'openai' not found ...`);
- `local_embedder` (the inference capability's local models): `/v1/embeddings` for a model no
  upstream serves goes there (the gateway owns `/v1/embeddings` when it is on, see
  `app.embeddings_owner`), and `/v1/models` lists its models too.

`complete(path, body, key)` is a non-streamed call through routing/failover/limits for code in this
process (e.g. RAG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, Wiring
from xcstack.gateway import metrics
from xcstack.gateway.jobs import JobManager, disabled_routes
from xcstack.gateway.jobstore import open_job_store
from xcstack.gateway.prepare import ENDPOINTS
from xcstack.gateway.routes import build_routes
from xcstack.gateway.service import GatewayService
from xcstack.gateway.watchdog import Watchdog

WIRING = Wiring(uses=("secrets", "local_embedder", "local_llm", "usage", "safety"))


class GatewayCapability:
    name = "gateway"

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        settings = ctx.settings.gateway
        if ctx.services.local_llm is not None:  # the llm capability's worker: an upstream like any other
            local_llm = ctx.services.local_llm.upstream()
            settings = settings.model_copy(update={"upstreams": [*settings.upstreams, local_llm]})
        inference = ctx.settings.inference
        metrics.limit_keys(settings.metrics_keys)
        self.service = GatewayService(settings, max_body_bytes=ctx.settings.server.max_body_bytes,
                                      local=ctx.services.local_embedder,
                                      default_embedding_model=inference.default_embedding_model
                                      if inference.enabled else None, usage=ctx.services.usage)
        self.service.safety = ctx.services.safety  # content filters and labels, when the capability is on
        self.jobs = (JobManager(self.service, open_job_store(settings, ctx.state), settings.jobs)
                     if settings.jobs.enabled else None)

    async def complete(self, path: str, body: dict[str, Any], key: str = "internal") -> tuple[int, bytes]:
        from xcstack.httputil import dumps

        body = {**body, "stream": False}
        pr = self.service.prepare_data(ENDPOINTS[path], body, dumps(body), key)
        wd = Watchdog()
        try:
            return await self.service.complete(pr, wd)
        finally:
            await wd.close()

    def routes(self) -> Sequence[BaseRoute]:
        routes = build_routes(self.service, self.jobs)
        if self.jobs is None:
            routes += disabled_routes()
        return routes

    async def start(self) -> None:
        # `api_key = "secret:NAME"`: from the security capability's store (it starts before this one)
        secrets = self.ctx.services.secrets
        for i, up in enumerate(self.service.upstreams):
            await up.resolve_api_key(secrets, f"gateway.upstreams[{i}].api_key")
        await self.service.start()
        if self.jobs is not None:
            await self.jobs.start()

    async def stop(self) -> None:
        if self.jobs is not None:
            await self.jobs.stop()
        await self.service.stop()

    async def ready(self) -> tuple[bool, str]:
        """Upstream health decides readiness. A degraded shared rate limiter (Redis silent) is reported
        in the detail but keeps the node ready: it serves with per-node limits, and every node shares
        that Redis, so failing readiness would take the whole fleet out of the load balancer."""
        ok, detail = self.service.router.health()
        await self.service.limiter.probe()
        degraded = self.service.limiter.degraded()
        return ok, f"{detail}; {degraded}" if degraded else detail


def create(ctx: AppContext) -> GatewayCapability | None:
    if not ctx.settings.gateway.enabled:
        return None
    return GatewayCapability(ctx)
