"""The thin HTTP adapter: raw ASGI endpoints mounted as Starlette routes.

The generation endpoints are raw ASGI apps (not `request_response` functions) so the service
controls the body read, `http.disconnect` watching and the streamed `send` itself.

Permissions: the routes carry no `@requires` mark, so the security middleware checks the route
permission (`route:/v1/chat/completions`, `post`, ...); the gateway then checks the model itself
with `authorize(request, "model:<name>", "invoke")` (also when a job is submitted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.gateway.service import ENDPOINTS, Endpoint, GatewayService
from xcstack.gateway.types import Receive, Scope, Send
from xcstack.httputil import JSONResponse

if TYPE_CHECKING:
    from xcstack.gateway.jobs import JobManager


class ProxyEndpoint:
    """ASGI app for one OpenAI endpoint."""

    def __init__(self, service: GatewayService, endpoint: Endpoint) -> None:
        self.service = service
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.service.handle(self.endpoint, scope, receive, send)


def build_routes(service: GatewayService, jobs: JobManager | None) -> list[BaseRoute]:
    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": service.list_models()})

    routes: list[BaseRoute] = [
        Route(path, ProxyEndpoint(service, ep), methods=["POST"]) for path, ep in ENDPOINTS.items()
    ]
    routes.append(Route("/v1/models", list_models, methods=["GET"]))
    if jobs is not None:
        routes += jobs.routes()
    return routes
