"""The crypto capability: HTTP routes, the `crypto` service for other capabilities, the HSM owner.

- `create(ctx)` sets `ctx.services.crypto` to a `CryptoClient` with async `sign`,
  `verify`, `encrypt`, `decrypt`, `hash`, `hmac`, `random` (and key management). With
  `access = "owner"` (default) the client talks to the HSM owner process; with `access = "direct"`
  (soft backend only) the keys are opened in this process.
- `side_processes(settings, plan)` declares the HSM owner (one instance) for the supervisor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, SideProcessSpec, Wiring
from xcstack.crypto.client import CryptoClient, DirectClient, OwnerClient
from xcstack.crypto.routes import CryptoRoutes
from xcstack.crypto.service import CryptoService
from xcstack.errors import XCError

if TYPE_CHECKING:
    from xcstack.config import Settings

WIRING = Wiring(provides=("crypto",))


def make_client(settings: Settings, state: Any = None) -> CryptoClient:
    """The client for this process: owner IPC client, or the in-process soft service."""
    from xcstack.crypto.owner import build_service, socket_path

    if settings.crypto.access == "direct":

        async def factory() -> CryptoService:
            return await build_service(settings, state)

        return DirectClient(factory)
    return OwnerClient(socket_path(settings), settings.crypto)


class CryptoCapability:
    name = "crypto"

    def __init__(self, settings: Settings, client: CryptoClient) -> None:
        self.settings = settings
        self.client = client
        self._routes = CryptoRoutes(client, settings.crypto)

    def routes(self) -> Sequence[BaseRoute]:
        return self._routes.routes()

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        await self.client.close()

    async def ready(self) -> tuple[bool, str]:
        try:
            meta, _ = await asyncio.wait_for(self.client.call("ping"), 1.0)
        except (XCError, TimeoutError) as exc:
            return False, f"crypto backend not reachable: {exc}"
        return True, f"backend {meta.get('backend')} ({self.settings.crypto.access})"


def create(ctx: AppContext) -> CryptoCapability | None:
    settings = ctx.settings
    if not settings.crypto.enabled:
        return None
    client = make_client(settings, ctx.state)
    ctx.services.crypto = client
    return CryptoCapability(settings, client)


def side_processes(settings: Settings, plan: Any = None) -> list[SideProcessSpec]:
    """The HSM owner (one process) when keys are held by the owner."""
    if not settings.crypto.enabled or settings.crypto.access != "owner":
        return []
    from xcstack.crypto.owner import socket_path
    from xcstack.ipc.channel import socket_accepts

    sock = socket_path(settings)

    def ready(_index: int) -> bool:
        return socket_accepts(sock)

    return [SideProcessSpec(name="hsm-owner", target="xcstack.crypto.owner:run_owner", instances=1, ready_check=ready)]
