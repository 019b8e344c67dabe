"""Serve a small app through the worker's own server set-up (`xcstack.worker.run_uvicorn` / `run_granian`)
for the raw-socket tests of request-phase limits: `python -m tests.core._edge_serve PORT uvicorn|granian`.
Settings come from `XC_*` variables; besides the probe routes it offers `POST /v1/edge/stream`, which reads
its body and then streams for ~3 s (longer than the tests' timeouts)."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.observability.logs import setup_logging
from xcstack.security.guard import requires_route


class EdgeCapability:
    name = "edge"

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/edge/stream", self.stream, methods=["POST"])]

    @requires_route
    async def stream(self, request: Request) -> Response:
        await request.body()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(4):
                await asyncio.sleep(0.8)
                yield f"chunk{i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"


def create(ctx: Any) -> EdgeCapability:
    return EdgeCapability()


def main() -> None:
    settings = load_settings(None)
    setup_logging("INFO", json_format=True)
    app = create_app(settings, capability_modules=["tests.core.probe_capability", "tests.core._edge_serve"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    sock.listen(128)
    sock.set_inheritable(True)
    print("edge server listening", flush=True)
    from xcstack.worker import run_granian, run_uvicorn

    (run_granian if sys.argv[2] == "granian" else run_uvicorn)(settings, sock, app)


if __name__ == "__main__":
    main()
