"""The llm capability: a local chat model in a supervised llama.cpp worker, served behind the gateway.

It routes nothing itself. It gives the gateway `Services.local_llm`, whose `upstream()` is an upstream
entry generated for the worker (127.0.0.1:<port>, the worker's key, `slots` in flight and a bounded
queue per http worker, the context per request): `/v1/models`, chat and completions, streaming,
admission, rate limits, permissions (`model:<name>`), audit and metrics are then the gateway's, the
same as for a remote vLLM. With the gateway off the model is not reachable (nothing is mounted).

The supervisor learns the worker's port and key from `child_env` (chosen once per `xcstack serve`:
a respawned worker binds the same port, so http workers keep their upstream), and starts the worker
from `side_processes` only when the model is in the LLM repository (`xcstack llm assemble`).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, SideProcessSpec, Wiring
from xcstack.llm.worker import KEY_ENV, PORT_ENV, THREADS_ENV, read_state, state_path, worker_port

if TYPE_CHECKING:
    from xcstack.config import Settings
    from xcstack.gateway.settings import UpstreamSettings

WIRING = Wiring(provides=("local_llm",))
UPSTREAM_NAME = "local-llm"


def runs(settings: Settings) -> bool:
    """Enabled, the model is there, and llama.cpp is installed (no xllamacpp wheel for this CPU: nothing
    starts, `xcstack doctor` says why). The tuning plan asks the same (PlanOverrides.llm)."""
    return settings.llm.worker_wanted(settings.data_dir)


class LocalLLM:
    """What the gateway needs to route to the worker (Services.local_llm)."""

    def __init__(self, settings: Settings, port: int, key: str) -> None:
        self.settings = settings
        self.port = port
        self.key = key

    @property
    def model_name(self) -> str:
        return self.settings.llm.public_name

    def upstream(self) -> UpstreamSettings:
        from xcstack.gateway.settings import TimeoutSettings, UpstreamSettings

        llm = self.settings.llm
        return UpstreamSettings(
            name=UPSTREAM_NAME,
            base_url=f"http://127.0.0.1:{self.port}/v1",
            api_key=self.key or None,  # type: ignore[arg-type]  # pydantic makes it a SecretStr
            models=[llm.public_name],
            max_concurrency=llm.slots,  # a request beyond the slots would only wait inside llama.cpp
            max_queue=llm.max_queue,
            context_length=llm.ctx_size,
            embeddings=False,
            timeouts=TimeoutSettings(connect_s=1.0, ttfb_s=llm.request_timeout_s,
                                     idle_s=min(60.0, llm.request_timeout_s), total_s=llm.request_timeout_s),
        )


class LLMCapability:
    name = "llm"

    def __init__(self, settings: Settings, local: LocalLLM) -> None:
        self.settings = settings
        self.local = local

    def routes(self) -> Sequence[BaseRoute]:
        return []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ready(self) -> tuple[bool, str]:
        """From the worker's state file (a few bytes; no request to the worker)."""
        state = read_state(self.settings)
        if state.startswith("ready") or (not state and self.settings.llm.port):
            return True, f"llm {self.local.model_name} on 127.0.0.1:{self.local.port}"
        if state.startswith("failed"):
            return False, f"llm worker: {state[len('failed '):]}"
        return False, f"llm worker: {state or 'not started'}"


def create(ctx: AppContext) -> LLMCapability | None:
    settings = ctx.settings
    if not runs(settings):
        return None
    port = worker_port(settings)
    if not port:  # no supervisor gave one, none configured: nothing to route to
        return None
    local = LocalLLM(settings, port, os.environ.get(KEY_ENV, ""))
    ctx.services.local_llm = local
    return LLMCapability(settings, local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(settings: Settings, plan: Any) -> dict[str, str]:
    """The worker's port (`[llm] port`, else a free one) and a fresh key, for every child: the worker
    binds and requires them, the http workers' gateway sends them."""
    if not runs(settings):
        return {}
    return {PORT_ENV: str(settings.llm.port or _free_port()), KEY_ENV: secrets.token_urlsafe(24)}


def worker_cpus(settings: Settings, plan: Any) -> list[int]:
    """The tuning plan's llm cores (`[llm] cpus` when set: the plan honours them too); [] = not pinned."""
    if plan is None:
        return list(settings.llm.cpus or [])
    if not getattr(plan, "pin", True):
        return []
    return list(getattr(plan, "llm_cpus", None) or settings.llm.cpus or [])


def worker_threads(settings: Settings, plan: Any) -> int:
    """Decode threads: `[llm] threads`, else one per core the worker gets (0 = one per core it can run on)."""
    if settings.llm.threads:
        return settings.llm.threads
    planned = int(getattr(plan, "llm_threads", 0) or 0) if plan is not None else 0
    return planned or len(worker_cpus(settings, plan))


def side_processes(settings: Settings, plan: Any) -> list[SideProcessSpec]:
    if not runs(settings):
        return []

    def ready(index: int) -> bool:  # loaded, or refused (no point holding the http workers back)
        return read_state(settings, index).startswith(("ready", "failed"))

    state_path(settings).unlink(missing_ok=True)  # a previous run's "ready" must not pass the check
    cpus = worker_cpus(settings, plan)
    threads = worker_threads(settings, plan)
    return [SideProcessSpec(name="llm-worker", target="xcstack.llm.worker:main", instances=1,
                            cpus=[cpus] if cpus else (), env={THREADS_ENV: str(threads)} if threads else {},
                            ready_check=ready)]
