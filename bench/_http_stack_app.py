"""A plugin capability used only by bench/http_stack.py: a trivial route and a proxy route."""

from __future__ import annotations

import os
from collections.abc import Sequence

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.capability import AppContext
from xcstack.httputil import JSONResponse
from xcstack.security.guard import requires_route

UPSTREAM = os.environ.get("XC_BENCH_UPSTREAM", "http://127.0.0.1:1/")


class HttpStackBench:
    name = "http-stack-bench"

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    def routes(self) -> Sequence[BaseRoute]:
        return [Route("/bench/ping", self.ping), Route("/bench/proxy", self.proxy)]

    @requires_route
    async def ping(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    @requires_route
    async def proxy(self, request: Request) -> Response:
        assert self.session is not None
        async with self.session.get(UPSTREAM) as r:
            body = await r.read()
        return Response(body, status_code=r.status, media_type="application/json")

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def ready(self) -> tuple[bool, str]:
        return True, "bench"


def create(ctx: AppContext) -> HttpStackBench:
    return HttpStackBench()
