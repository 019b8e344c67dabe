"""The proxied endpoints and request validation: from a client's bytes to a `Prepared` request that
authorization, rate limits and routing all read, and the body the upstream gets.

The client's bytes go upstream untouched unless something must change (an alias, usage for streams),
so validation keeps both the raw body and its parsed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from xcstack.errors import BadRequest, CoreCode
from xcstack.gateway import protocol as p
from xcstack.gateway.protocol import GatewayCode
from xcstack.gateway.upstream import Target
from xcstack.httputil import dumps, loads, validation_error


@dataclass(slots=True)
class Endpoint:
    path: str  # the public path, e.g. /v1/chat/completions
    upstream_path: str  # appended to the upstream base_url (which ends in /v1)
    model: type[BaseModel]
    generation: bool  # has max_tokens / stream
    label: str


CHAT = Endpoint("/v1/chat/completions", "/chat/completions", p.ChatCompletionRequest, True, "chat")
COMPLETIONS = Endpoint("/v1/completions", "/completions", p.CompletionRequest, True, "completions")
EMBEDDINGS = Endpoint("/v1/embeddings", "/embeddings", p.EmbeddingRequest, False, "embeddings")
ENDPOINTS = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}
# /v1/rerank (and /rerank): validated and answered by rerank.py (local cross-encoder, bi-encoder fallback),
# or routed to an upstream like the others; not a job endpoint
RERANK = Endpoint("/v1/rerank", "/rerank", p.RerankRequest, False, "rerank")


@dataclass(slots=True)
class Prepared:
    """A validated request, ready to route."""

    endpoint: Endpoint
    data: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    client_usage: bool
    key: str
    estimate: int
    request_id: str | None = None
    safety: Any = None  # the safety capability's checks of this request (`safety.hooks.RequestSafety`)
    usage: Any = None  # the usage capability's ticket (quota reservation, ledger record), when it is on


def parse_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else 400 `invalid_json`."""
    if not raw:
        raise BadRequest("request body is empty; JSON expected", code=CoreCode.INVALID_JSON)
    try:
        data = loads(raw)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}", code=CoreCode.INVALID_JSON) from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code=CoreCode.INVALID_JSON)
    return data


def validate(endpoint: Endpoint, data: dict[str, Any], raw: bytes, key: str, max_tokens_limit: int) -> Prepared:
    """Validate `data` against the endpoint's model (strict types, non-empty input, token limits);
    `data` must name its model already (the caller fills in a default)."""
    try:
        req: Any = endpoint.model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if endpoint is EMBEDDINGS:
        p.check_embedding_input(req.input)
    stream = False
    client_usage = False
    if endpoint.generation:
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, field, None)
            if value is not None and value > max_tokens_limit:
                raise BadRequest(f"{field} is {value}; the largest accepted is {max_tokens_limit}",
                                 code=GatewayCode.MAX_TOKENS_TOO_LARGE, param=field)
        stream = bool(req.stream)
        client_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Prepared(endpoint, data, raw, req.model, stream, client_usage, key, p.estimate_prompt_tokens(data))


def check_context(pr: Prepared, context_length: int | None) -> None:
    """`max_tokens` that cannot fit the model's context (an upstream's `context_length`, e.g. a local llm slot):
    400 before the call, naming the limit, instead of an answer cut short without a word."""
    if context_length is None or not pr.endpoint.generation:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = pr.data.get(field)
        if isinstance(value, int) and value >= context_length:
            raise BadRequest(f"{field} is {value}; model {pr.model!r} has a context of {context_length} tokens per "
                             "request (prompt and answer together)", code=GatewayCode.MAX_TOKENS_TOO_LARGE, param=field)


def upstream_body(pr: Prepared, target: Target) -> bytes:
    """The body sent upstream: the client's bytes untouched unless the model name changes
    (alias) or, for streams, usage must be requested (for metrics and token limits)."""
    rewrite_model = target.model != pr.model
    want_usage = pr.stream and not pr.client_usage
    if not rewrite_model and not want_usage:
        return pr.raw
    data = dict(pr.data)
    if rewrite_model:
        data["model"] = target.model
    if want_usage:
        opts = data.get("stream_options")
        data["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return dumps(data)
