"""The inference capability: model repository, model workers (side processes), KServe v2 and
OpenAI embeddings routes, and `Services.local_embedder` (`inference.local.LocalModels`) for the
gateway and the vector capability.

It mounts `/v1/embeddings` only when `app.py` says it owns it (`ctx.embeddings_owner`): with the
gateway on, the gateway serves it and hands local model names to `Services.local_embedder`.

The supervisor learns the model-worker count and why local inference cannot run here (if so) from
`child_env`, and passes them to every child it starts; nothing here writes `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, SideProcessSpec, Wiring
from xcstack.errors import Overloaded
from xcstack.inference.pacing import LoopPacer
from xcstack.inference.protocol import InferenceCode
from xcstack.inference.worker import (
    COUNT_ENV,
    WORKER_ENV,
    count_known,
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


WIRING = Wiring(provides=("local_embedder",))
# Why local inference cannot run on this machine, passed by the supervisor to its children (`child_env`:
# the tuning plan's `inference_unavailable`, e.g. onnxruntime killed by SIGSEGV under qemu-user).
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
        raise Overloaded(f"local inference cannot run on this machine: {self.reason}",
                         code=InferenceCode.INFERENCE_UNAVAILABLE)

    async def rerank(self, model: str, query: str, documents: Sequence[str], timeout: float
                     ) -> tuple[np.ndarray, int]:
        raise Overloaded(f"local inference cannot run on this machine: {self.reason}",
                         code=InferenceCode.INFERENCE_UNAVAILABLE)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None,
                    timeout: float) -> dict[str, np.ndarray]:  # fmt: skip
        raise Overloaded(f"local inference cannot run on this machine: {self.reason}",
                         code=InferenceCode.INFERENCE_UNAVAILABLE)


class InferenceCapability:
    name = "inference"

    def __init__(self, settings: Settings, *, backend: Backend | None = None, total_workers: int | None = None,
                 mount_embeddings: bool = True) -> None:
        from xcstack.inference.client import InlineBackend, ProcessBackend
        from xcstack.inference.local import LocalModels
        from xcstack.inference.repository import ModelRepository

        self.root_settings = settings
        self.settings = settings.inference
        self.repo = ModelRepository(self.settings.repository_dir(settings.data_dir)).scan()
        self.mount_embeddings = mount_embeddings
        if backend is None:
            n = total_workers
            plan: Any = None
            if n is None and self.settings.mode == "process":
                plan = None if count_known(settings) else current_plan(settings)
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
        self.models = LocalModels(self.settings, self.repo, backend, self.pacer)

    # --- Capability protocol ---------------------------------------------------------------------
    def routes(self) -> Sequence[BaseRoute]:
        from xcstack.inference.routes import InferenceRoutes

        return InferenceRoutes(self.models).routes(embeddings=self.mount_embeddings)

    async def start(self) -> None:
        await self.backend.start()

    async def stop(self) -> None:
        await self.backend.stop()

    async def ready(self) -> tuple[bool, str]:
        return await self.models.ready()


def create(ctx: AppContext) -> InferenceCapability | None:
    if not ctx.settings.inference.enabled:
        return None
    cap = InferenceCapability(ctx.settings, mount_embeddings=ctx.embeddings_owner == "inference")
    ctx.services.local_embedder = cap.models
    return cap


def planned_workers(settings: Settings, plan: Any) -> tuple[int, str]:
    """(model workers to start, why local inference cannot run here or ""), for process mode."""
    n = worker_count(settings, plan)
    off = str(getattr(plan, "inference_unavailable", "") or "") if n <= 0 else ""
    from xcstack.inference.repository import ModelRepository

    repo = ModelRepository(settings.inference.repository_dir(settings.data_dir)).scan()
    if n <= 0 or not repo.models():
        n = 0  # nothing to serve: no idle processes (import a model, then restart)
    return n, off


def child_env(settings: Settings, plan: Any) -> dict[str, str]:
    """What the supervisor's children (http workers, model workers) learn instead of re-deriving the
    plan: the model-worker count, and why local inference cannot run here ("" when it can; an http
    worker then must not load models inline either)."""
    inf = settings.inference
    if not inf.enabled or inf.mode != "process":
        return {}
    n, off = planned_workers(settings, plan)
    return {COUNT_ENV: str(n), UNAVAILABLE_ENV: off}


def side_processes(settings: Settings, plan: Any) -> list[SideProcessSpec]:
    """One model worker per core slot of the tuning plan (or [inference] workers / worker_cpus)."""
    inf = settings.inference
    if not inf.enabled or inf.mode != "process":
        return []
    n, _off = planned_workers(settings, plan)
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
