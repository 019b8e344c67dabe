"""The thin HTTP adapter: raw ASGI endpoints mounted as Starlette routes.

The generation endpoints are raw ASGI apps (not `request_response` functions) so the service
controls the body read, `http.disconnect` watching and the streamed `send` itself.

Permissions: the routes declare the route permission (`@requires_route`: `route:/v1/chat/completions`,
`post`, ...); the gateway then checks the model itself with `authorize(request, "model:<name>",
"invoke")` (also when a job is submitted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import SSE, ApiDoc, api, api_for
from xcstack.gateway import protocol as p
from xcstack.gateway.prepare import ENDPOINTS, RERANK, Endpoint
from xcstack.gateway.service import GatewayService
from xcstack.gateway.types import Receive, Scope, Send
from xcstack.httputil import JSONResponse
from xcstack.security.guard import requires_route

if TYPE_CHECKING:
    from xcstack.gateway.jobs import JobManager


_CHECKS = ("Also `invoke` on `model:<model>`, checked before the model is looked up (a caller without it gets 403, "
           "never a 404 that tells which models exist).")
_RELAYED = ("The upstream's answer is relayed as it is: a success keeps every field the upstream sent; a 4xx the "
            "upstream itself answered (it refused the request) comes back with the upstream's status and body. "
            "Failover: a connect error, timeout, 429 or 5xx before the first byte is retried on the next upstream "
            "of the model; when none is left: 503 `upstream_unavailable` / `overloaded` (`Retry-After`), "
            "502 `upstream_error`, 504 `upstream_timeout`. A client that hangs up cancels the upstream call (no "
            "answer is sent; logged as 499).")


def _streamed(chunk: str) -> str:
    return (f"With `stream: true`: the upstream's server-sent events (`{chunk}` objects), then `data: [DONE]`; "
            "usage comes in a last chunk only with `stream_options.include_usage`. An upstream that fails "
            "mid-stream ends it with `data: {\"error\": {...}}` (code `stream_interrupted` or `upstream_timeout`) "
            "and `data: [DONE]`.")


_ERRORS = (404, 502, 504)
#: the contract of each proxied endpoint (its request model is the one `service.prepare` validates with)
PROXY_DOCS = {
    "/v1/chat/completions": ApiDoc(
        "Chat completion (OpenAI), routed to an upstream that serves the model", body=p.ChatCompletionRequest,
        response=p.ChatCompletion, streams={SSE: _streamed("chat.completion.chunk")}, errors=_ERRORS,
        checks=_CHECKS, description=_RELAYED),
    "/v1/completions": ApiDoc(
        "Text completion (OpenAI legacy), routed to an upstream that serves the model", body=p.CompletionRequest,
        response=p.Completion, streams={SSE: _streamed("text_completion")}, errors=_ERRORS,
        checks=_CHECKS, description=_RELAYED),
    "/v1/embeddings": ApiDoc(
        "Embeddings (OpenAI): an upstream's embedding model, else a local one from the model repository",
        body=p.EmbeddingRequest, response=p.EmbeddingList, errors=_ERRORS, checks=_CHECKS,
        description="Without `model`: the default embedding model (400 `model_required` when none is served here). "
                    "A model no upstream serves goes to the local inference capability (text input only). "
                    + _RELAYED),
}

RERANK_DOC = ApiDoc(
    "Rerank documents against a query (vLLM/Jina/Cohere shape): a local cross-encoder, an upstream, or cosine "
    "of local embeddings", body=p.RerankRequest, response=p.RerankResponse, errors=_ERRORS, checks=_CHECKS,
    description="`results` sorted best first (`index` into `documents`, `relevance_score`, `document.text` unless "
                "`return_documents: false`), cut to `top_n`. Who answers: a local model of kind `rerank` "
                "(`method: cross-encoder`, score in (0, 1)); else an upstream listing the model (routed and failed "
                "over like chat; `documents` are sent as strings); else, for a local embedding model, cosine "
                "similarity (`method: bi-encoder`). Without `model`: `gateway.rerank.default_model`, else the first "
                "local rerank model, else the default embedding model (400 `model_required` when none). Limits: "
                "400 `too_many_documents`, `document_too_long`, `query_too_long` (`gateway.rerank`). `/rerank` is "
                "an alias. " + _RELAYED)


class ProxyEndpoint:
    """ASGI app for one OpenAI endpoint."""

    def __init__(self, service: GatewayService, endpoint: Endpoint) -> None:
        self.service = service
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.service.handle(self.endpoint, scope, receive, send)


def build_routes(service: GatewayService, jobs: JobManager | None) -> list[BaseRoute]:
    @requires_route
    @api("The models served here: the upstreams' models and aliases, and the local models", response=p.ModelList)
    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": service.list_models()})

    routes: list[BaseRoute] = []
    for path, ep in ENDPOINTS.items():
        endpoint = requires_route(ProxyEndpoint(service, ep))
        api_for("POST", endpoint, PROXY_DOCS[path])
        routes.append(Route(path, endpoint, methods=["POST"]))
    for path in (RERANK.path, "/rerank"):  # /rerank: the path Jina- and Cohere-style clients call
        endpoint = requires_route(ProxyEndpoint(service, RERANK))
        api_for("POST", endpoint, RERANK_DOC)
        routes.append(Route(path, endpoint, methods=["POST"]))
    routes.append(Route("/v1/models", list_models, methods=["GET"]))
    if jobs is not None:
        routes += jobs.routes()
    return routes
