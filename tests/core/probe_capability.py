"""A tiny capability used only by the core tests: a JSON echo route and a controllable readiness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.capability import AppContext
from xcstack.httputil import JSONResponse, read_model

READY = {"ok": True}


class Echo(BaseModel):
    text: str
    n: int = 1


class ProbeCapability:
    name = "probe"

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/v1/echo", self.echo, methods=["POST"]),
            Route("/v1/slow", self.slow, methods=["GET"]),
            Route("/v1/block", self.block, methods=["GET"]),
            Route("/v1/crash", self.crash, methods=["GET"]),
        ]

    async def echo(self, request: Request) -> Response:
        body = await read_model(request, Echo)
        return JSONResponse({"text": body.text * body.n})

    async def slow(self, request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("s", "1")))
        return JSONResponse({"slept": True})

    async def block(self, request: Request) -> Response:
        time.sleep(float(request.query_params.get("s", "0.2")))  # noqa: ASYNC251 - deliberately blocks the loop
        return JSONResponse({"blocked": True})

    async def crash(self, request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def ready(self) -> tuple[bool, str]:
        return READY["ok"], "probe ok" if READY["ok"] else "probe says not ready"


def create(ctx: AppContext) -> ProbeCapability:
    return ProbeCapability()
