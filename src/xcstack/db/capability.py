"""The db capability: the DB-API bridge and its named-query endpoint.

Uses `Services.secrets` (the security capability's SecretStore, created and started before this one)
at start to resolve `secret:NAME` / `{secret:NAME}` references in DSNs; see docs/db.md, "Passwords".
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, Wiring

WIRING = Wiring(uses=("secrets",))


class DbCapability:
    name = "db"

    def __init__(self, ctx: AppContext) -> None:
        from xcstack.db.bridge import Bridge  # the bridge and its drivers load only when a database is configured

        self.ctx = ctx
        self.settings = ctx.settings.db
        self.bridge = Bridge(self.settings)

    def routes(self) -> Sequence[BaseRoute]:
        from xcstack.db.routes import build_routes

        return build_routes(self.bridge, self.settings.max_body_bytes)

    async def start(self) -> None:
        # `secret:NAME` / `{secret:NAME}` in DSNs: from the security capability's store (started before this one)
        await self.bridge.start(secrets=self.ctx.services.secrets)

    async def stop(self) -> None:
        await self.bridge.stop()

    async def ready(self) -> tuple[bool, str]:
        return self.bridge.ready()


def create(ctx: AppContext) -> DbCapability | None:
    """None (disabled) when no database is configured."""
    if not ctx.settings.db.databases:
        return None
    return DbCapability(ctx)
