"""The db capability: the DB-API bridge and its named-query endpoint.

Publishes the bridge as the `db.bridge` service, so other capabilities can run named queries
(`await ctx.get("db.bridge").query("main", "user_by_id", {"id": 1})`).

Uses the `secrets` service (the security capability's SecretStore, which starts earlier) at start to
resolve `secret:NAME` / `{secret:NAME}` references in DSNs; see docs/db.md, "Passwords".
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute

from xcstack.capability import AppContext


class DbCapability:
    name = "db"

    def __init__(self, ctx: AppContext) -> None:
        from xcstack.db.bridge import Bridge  # the bridge and its drivers load only when a database is configured

        self.ctx = ctx
        self.settings = ctx.settings.db
        self.bridge = Bridge(self.settings)
        ctx.provide("db.bridge", self.bridge)

    def routes(self) -> Sequence[BaseRoute]:
        from xcstack.db.routes import build_routes

        return build_routes(self.bridge, self.settings.max_body_bytes)

    async def start(self) -> None:
        # `secret:NAME` / `{secret:NAME}` in DSNs: from the security capability's store (started before this one)
        await self.bridge.start(secrets=self.ctx.get("secrets"))

    async def stop(self) -> None:
        await self.bridge.stop()

    async def ready(self) -> tuple[bool, str]:
        return self.bridge.ready()


def create(ctx: AppContext) -> DbCapability | None:
    """None (disabled) when no database is configured."""
    if not ctx.settings.db.databases:
        return None
    return DbCapability(ctx)
