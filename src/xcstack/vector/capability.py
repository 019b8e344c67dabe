"""The vector capability: plugs the VectorStore + service + routes into xcstack. Texts are embedded by
`Services.local_embedder` (the inference capability) when it is there; without it they get 400."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, SideProcessSpec, Wiring

if TYPE_CHECKING:
    # the store, service and routes (numpy; pymilvus or psycopg) load in create(), when the capability is on
    from xcstack.config import Settings
    from xcstack.vector.service import Embedder
    from xcstack.vector.store import VectorStore

log = logging.getLogger("xcstack.vector")
WIRING = Wiring(uses=("local_embedder",))


class VectorCapability:
    name = "vector"

    def __init__(self, ctx: AppContext, store: VectorStore | None = None) -> None:
        from xcstack.vector.service import VectorService, make_store

        self.ctx = ctx
        self.settings = ctx.settings.vector
        self.store = store or make_store(self.settings, ctx.settings.data_dir)
        self.service = VectorService(self.settings, self.store, embedder=self._embedder)

    def _embedder(self) -> Embedder | None:
        local = self.ctx.services.local_embedder  # read per request: tests swap in a double
        return local.embed if local is not None else None

    def routes(self) -> Sequence[BaseRoute]:
        from xcstack.vector.routes import build_routes

        return build_routes(self.service)

    async def start(self) -> None:
        await self.store.start()

    async def stop(self) -> None:
        await self.store.close()

    async def ready(self) -> tuple[bool, str]:
        ok, detail = await self.store.health()
        loading = getattr(self.store, "loading", None)
        busy: dict[str, float] = loading() if ok and callable(loading) else {}
        if busy:
            what = ", ".join(f"{n} ({s:.0f}s)" for n, s in sorted(busy.items()))
            if self.store.backend == "milvus":
                # a Milvus collection that is loading cannot be searched yet
                return False, f"milvus: loading/indexing {what}"
            return True, f"{self.store.backend}: ok; building index {what} (searches scan meanwhile)"
        return ok, f"{self.store.backend}: {detail}"


def create(ctx: AppContext) -> VectorCapability | None:
    if not ctx.settings.vector.enabled:
        return None
    return VectorCapability(ctx)


def side_processes(settings: Settings, plan: Any) -> list[SideProcessSpec]:
    """Milvus Lite as one supervised side process that every http worker connects to."""
    v = settings.vector
    if not v.enabled or v.backend != "milvus" or v.milvus.uri is not None or v.milvus.lite_mode == "in_process":
        return []
    port = v.milvus.lite_port
    return [
        SideProcessSpec(
            name="milvus-lite",
            target="xcstack.vector.lite_server:run",
            instances=1,
            ready_check=lambda _index: _port_open(port),
        )
    ]


def _port_open(port: int, timeout: float = 0.2) -> bool:
    """Is the Milvus Lite side process listening? (kept here: importing pymilvus costs ~120 MB)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
