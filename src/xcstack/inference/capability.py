"""The inference capability: model repository, model workers (side processes), KServe v2 and
OpenAI embeddings routes, and the `local_embedder` service for other capabilities.

`ctx.provide("local_embedder", fn)`: `await fn(model: str | None, inputs: list[str])` returns
`(vectors: numpy float32 [n, dims], usage: {"prompt_tokens", "total_tokens"})`; it raises XCError
(404 unknown model, 503 retriable overload / worker down, 504 timeout).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, SideProcessSpec
from xcstack.errors import NotFound, Overloaded
from xcstack.inference import metrics
from xcstack.inference.pacing import LoopPacer
from xcstack.inference.worker import (
    COUNT_ENV,
    WORKER_ENV,
    _count_known,
    current_plan,
    socket_path,
    worker_count,
    worker_cpus,
)

if TYPE_CHECKING:
    # numpy and what needs it load only when the capability is enabled: an http worker with inference
    # off (the LLM-gateway deployment) imports this module and must not pay numpy's ~15 MB
    import numpy as np

    from xcstack.config import Settings
    from xcstack.inference.client import Backend
    from xcstack.inference.protocol import EmbeddingsRequest


EMBED_CHUNK = 512  # texts per worker call for `local_embedder`
# Why local inference cannot run on this machine, published by the supervisor for its http workers
# (the tuning plan's `inference_unavailable`, e.g. onnxruntime killed by SIGSEGV under qemu-user).
UNAVAILABLE_ENV = "XC_INFERENCE_UNAVAILABLE"


class UnavailableBackend:
    """Local inference cannot run here: no model worker is started and nothing is loaded inline (the
    import that fails in a child would take this process down); requests get 503 with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ready(self) -> tuple[bool, str]:
        return False, f"degraded: local inference cannot run on this machine: {self.reason} (see `xcstack doctor`)"

    async def model_ready(self, model: str) -> bool:
        return False

    async def embed(self, model: str, texts: Sequence[str], timeout: float) -> tuple[np.ndarray, int]:
        raise Overloaded(f"local inference cannot run on this machine: {self.reason}", code="inference_unavailable")

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None,
                    timeout: float) -> dict[str, np.ndarray]:  # fmt: skip
        raise Overloaded(f"local inference cannot run on this machine: {self.reason}", code="inference_unavailable")


class InferenceCapability:
    name = "inference"

    def __init__(self, settings: Settings, *, backend: Backend | None = None, total_workers: int | None = None,
                 mount_embeddings: bool = True) -> None:
        from xcstack.inference.client import InlineBackend, ProcessBackend
        from xcstack.inference.repository import ModelRepository

        self.root_settings = settings
        self.settings = settings.inference
        self.repo = ModelRepository(self.settings.repository_dir(settings.data_dir)).scan()
        self.mount_embeddings = mount_embeddings
        if backend is None:
            n = total_workers
            plan: Any = None
            if n is None and self.settings.mode == "process":
                plan = None if _count_known(settings) else current_plan(settings)
                n = worker_count(settings, plan)
            off = os.environ.get(UNAVAILABLE_ENV, "") or str(getattr(plan, "inference_unavailable", "") or "")
            if self.settings.mode == "process" and not n and off:
                backend = UnavailableBackend(off)
            elif self.settings.mode == "inline" or not n:
                backend = InlineBackend(self.repo, self.settings)
            else:
                backend = ProcessBackend(self.repo, self.settings, [str(socket_path(settings, i)) for i in range(n)])
        self.backend = backend
        self.pacer = LoopPacer(self.settings.loop_budget_ms / 1000.0) if self.settings.loop_budget_ms > 0 else None

    # --- Capability protocol ---------------------------------------------------------------------
    def routes(self) -> Sequence[BaseRoute]:
        from xcstack.inference.routes import InferenceRoutes

        return InferenceRoutes(self).routes(embeddings=self.mount_embeddings)

    async def start(self) -> None:
        await self.backend.start()

    async def stop(self) -> None:
        await self.backend.stop()

    async def ready(self) -> tuple[bool, str]:
        """Not ready without a model: an enabled inference capability that cannot embed anything would
        send a load balancer traffic it must fail. A node meant to run without local models sets
        [inference] enabled = false."""
        if not self.repo.models():
            broken = "; ".join(e.error for e in self.repo.entries.values() if e.error)
            return False, (f"degraded: no model in {self.repo.root}" + (f" that loads ({broken})" if broken else "")
                           + "; run `xcstack model import-default`")  # fmt: skip
        return await self.backend.ready()

    # --- services --------------------------------------------------------------------------------
    def _embedding_model(self, name: str | None) -> str:
        model = name or self.settings.default_embedding_model
        entry = self.repo.get(model)
        if entry is None:
            raise NotFound(f"model {model!r} is not in the model repository", code="model_not_found")
        if entry.config is None:
            raise Overloaded(f"model {model!r} is unavailable: {entry.error}", code="model_unavailable")
        if entry.config.kind != "embedding":
            raise NotFound(f"model {model!r} is not an embedding model", code="model_not_found")
        return model

    async def embed(self, model: str | None, inputs: list[str]) -> tuple[np.ndarray, dict[str, int]]:
        """The `local_embedder` service: texts -> unit-norm float32 vectors [n, dims] and usage."""
        name = self._embedding_model(model)
        try:
            if len(inputs) <= EMBED_CHUNK:
                vectors, tokens = await self.backend.embed(name, inputs, self.settings.request_timeout_s)
            else:  # internal callers (indexing) may pass thousands: chunks keep each call within the queue
                parts: list[np.ndarray] = []
                tokens = 0
                for i in range(0, len(inputs), EMBED_CHUNK):
                    v, t = await self.backend.embed(name, inputs[i : i + EMBED_CHUNK], self.settings.request_timeout_s)
                    parts.append(v)
                    tokens += t
                import numpy as np

                vectors = np.concatenate(parts)
        except Exception:
            metrics.count_request(name, "embed", "error")
            raise
        metrics.count_request(name, "embed", "ok")
        return vectors, {"prompt_tokens": tokens, "total_tokens": tokens}

    async def embed_request(self, name: str, req: EmbeddingsRequest) -> tuple[np.ndarray, dict[str, int]]:
        from xcstack.errors import BadRequest
        from xcstack.inference.protocol import texts_of

        texts = texts_of(req, self.settings.max_inputs, self.settings.max_input_chars)
        model = self._embedding_model(name)
        dims = self.repo.get(model).config.dimensions  # type: ignore[union-attr]
        if req.dimensions is not None and dims is not None and req.dimensions != dims:
            raise BadRequest(f"dimensions: model {model} produces {dims}-dimensional vectors only",
                             code="invalid_parameter", param="dimensions")
        return await self.embed(model, texts)

    async def embeddings_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The whole OpenAI /v1/embeddings exchange for a local model: request dict -> response dict
        (validation, limits, encoding_format, usage); raises XCError. For a combined dispatcher."""
        from xcstack.httputil import parse_model
        from xcstack.inference.protocol import EmbeddingsRequest, embeddings_response

        if self.pacer is not None:  # the gateway's /v1/embeddings comes this way: pace it like ours
            await self.pacer.turn()
        req = parse_model(body, EmbeddingsRequest)
        name = req.model or self.settings.default_embedding_model
        vectors, usage = await self.embed_request(name, req)
        if self.pacer is not None:
            await self.pacer.turn()
        return embeddings_response(name, vectors, usage["prompt_tokens"], req.encoding_format)

    def model_names(self) -> list[str]:
        return [m.name for m in self.repo.models()]

    def handles_embedding_model(self, model: str | None) -> bool:
        """For a combined /v1/embeddings: True when `model` (or the default) is a local embedding model."""
        entry = self.repo.get(model or self.settings.default_embedding_model)
        return entry is not None and entry.config is not None and entry.config.kind == "embedding"


def create(ctx: AppContext) -> InferenceCapability | None:
    if not ctx.settings.inference.enabled:
        return None
    # The gateway owns /v1/embeddings when it is in the app (it sends models no upstream serves to
    # `local_embedder`); otherwise this capability mounts its own. Needs the gateway listed first in
    # CAPABILITY_MODULES (it publishes "gateway.upstream_models" at create time).
    gateway_on = ctx.get("gateway.upstream_models") is not None
    cap = InferenceCapability(ctx.settings, mount_embeddings=not gateway_on)
    ctx.provide("local_embedder", cap.embed)
    ctx.provide("local_embeddings", cap.embeddings_body)
    ctx.provide("local_models", cap.model_names)
    ctx.provide("local_embedding_models", cap.handles_embedding_model)
    ctx.provide("local_embeddings_endpoint", _endpoint(cap))
    return cap


def _endpoint(cap: InferenceCapability) -> Any:
    from xcstack.inference.routes import InferenceRoutes

    return InferenceRoutes(cap).embeddings


def side_processes(settings: Settings, plan: Any) -> list[SideProcessSpec]:
    """One model worker per core slot of the tuning plan (or [inference] workers / worker_cpus)."""
    inf = settings.inference
    if not inf.enabled or inf.mode != "process":
        return []
    n = worker_count(settings, plan)
    off = str(getattr(plan, "inference_unavailable", "") or "") if n <= 0 else ""
    if off:  # http workers must not load models inline either
        os.environ[UNAVAILABLE_ENV] = off
    else:
        os.environ.pop(UNAVAILABLE_ENV, None)
    from xcstack.inference.repository import ModelRepository

    repo = ModelRepository(inf.repository_dir(settings.data_dir)).scan()
    if n <= 0 or not repo.models():
        n = 0  # nothing to serve: no idle processes (import a model, then restart)
    # children (http workers, model workers) inherit the count instead of re-deriving the plan
    os.environ[COUNT_ENV] = str(n)
    if n == 0:
        return []
    cpus = worker_cpus(settings, plan)

    def ready(index: int) -> bool:
        return socket_path(settings, index).exists()

    return [
        SideProcessSpec(
            name="model-worker",
            target="xcstack.inference.worker:main",
            instances=n,
            cpus=[cpus[i % len(cpus)] for i in range(n)] if cpus else (),
            env=dict(WORKER_ENV),
            ready_check=ready,
        )
    ]
