"""The usage capability: quotas, the usage ledger and cost (docs/usage.md). Listed in `capability.REGISTRY`.

Provides `Services.usage` (the `UsageService`: the gateway reserves before and settles after each call;
without this capability the gateway runs ungoverned). Uses `Services.groups` (the security capability's
group and user look-ups) to check the groups and users quotas name; without it they are taken as given.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute

from xcstack.capability import AppContext, Wiring
from xcstack.usage.routes import build_routes
from xcstack.usage.service import UsageService

WIRING = Wiring(provides=("usage",), uses=("groups",))


class UsageCapability:
    name = "usage"

    def __init__(self, ctx: AppContext) -> None:
        self.service = UsageService(ctx.settings.usage, ctx.state, ctx.services.groups)
        ctx.services.usage = self.service

    def routes(self) -> Sequence[BaseRoute]:
        return build_routes(self.service)

    async def start(self) -> None:
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()

    async def ready(self) -> tuple[bool, str]:
        led = self.service.ledger
        return True, f"ledger: {len(led.buf)} records buffered, {led.dropped} dropped, {led.quarantined} quarantined"


def create(ctx: AppContext) -> UsageCapability | None:
    if not ctx.settings.usage.enabled:
        return None
    return UsageCapability(ctx)
