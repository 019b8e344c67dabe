"""The console capability: the web console under /console (docs/console.md).

It provides and uses no service: its pages call the JSON API in process as the signed-in caller, so
it needs the security capability's middleware (sessions, the console cookie, audit) and is off
when `[security] enabled = false` (there would be nobody to sign in).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from starlette.routing import BaseRoute, Mount

from xcstack.capability import AppContext, Wiring
from xcstack.console.routes import build_routes
from xcstack.console.settings import ConsoleSettings
from xcstack.console.web import Pages

log = logging.getLogger("xcstack.console")

WIRING = Wiring()


class ConsoleCapability:
    name = "console"

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.pages = Pages(settings)

    def routes(self) -> Sequence[BaseRoute]:
        # a Mount: the console's HTML pages are not operations of the JSON API's OpenAPI document
        return [Mount("/console", routes=build_routes(self.pages))]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ready(self) -> tuple[bool, str]:
        return True, "console at /console"


def create(ctx: AppContext) -> ConsoleCapability | None:
    s = ctx.settings.console
    if not s.enabled:
        return None
    if not ctx.settings.security.enabled:
        log.warning("[console] is on but [security] is off: the console is not served (nobody could sign in)")
        return None
    return ConsoleCapability(s)
