"""A tiny capability used only by the core tests: a JSON echo route and a controllable readiness."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.capability import AppContext, SideProcessSpec
from xcstack.httputil import JSONResponse, read_model
from xcstack.ipc.channel import IPCServer, socket_accepts
from xcstack.security.guard import requires_route

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

    @requires_route
    async def echo(self, request: Request) -> Response:
        body = await read_model(request, Echo)
        return JSONResponse({"text": body.text * body.n})

    @requires_route
    async def slow(self, request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("s", "1")))
        return JSONResponse({"slept": True})

    @requires_route
    async def block(self, request: Request) -> Response:
        time.sleep(float(request.query_params.get("s", "0.2")))  # noqa: ASYNC251 - deliberately blocks the loop
        return JSONResponse({"blocked": True})

    @requires_route
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


def side_processes(settings: Any, plan: Any) -> list[SideProcessSpec]:
    """A slow-starting side process (only when XC_TEST_SIDE_SOCKET names its socket)."""
    path = os.environ.get("XC_TEST_SIDE_SOCKET")
    if not path:
        return []
    return [SideProcessSpec(name="probe-side", target="tests.core.probe_capability:run_side", instances=1,
                            cpus=[[min(os.sched_getaffinity(0))]],  # pinned: the process table shows its core
                            ready_check=lambda _i: socket_accepts(path))]


def run_side(settings: Any, index: int) -> None:
    time.sleep(2.0)  # a slow start: model load, device open...
    path = os.environ["XC_TEST_SIDE_SOCKET"]

    async def handler(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], bytes]:
        return {"pid": os.getpid()}, b""

    async def main() -> None:
        server = IPCServer(path, handler)
        await server.start()
        print(f"probe-side listening at {time.time():.3f}", flush=True)
        await server.serve_forever()

    asyncio.run(main())
