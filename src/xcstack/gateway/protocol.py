"""Wire schemas of the gateway: what crosses the HTTP boundary.

Request models validate the fields the gateway relies on (strict types, ranges); every other field
is allowed and passes through to the upstream untouched (`extra="allow"`; the raw JSON object is
what is forwarded, not a re-serialisation of these models).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xcstack.errors import BadRequest, CoreCode


class GatewayCode(StrEnum):
    """Stable error codes of the gateway (clients switch on them; docs/gateway.md, Errors)."""

    MODEL_REQUIRED = "model_required"
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    RATE_LIMITED_REQUESTS = "rate_limited_requests"
    RATE_LIMITED_TOKENS = "rate_limited_tokens"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_REJECTED = "upstream_rejected"  # an upstream's own 4xx, relayed
    STREAM_INTERRUPTED = "stream_interrupted"
    JOB_NOT_FOUND = "job_not_found"
    JOBS_FULL = "jobs_full"
    JOBS_DISABLED = "jobs_disabled"
    JOBS_STORE_UNAVAILABLE = "jobs_store_unavailable"
    CANCELLED = "cancelled"  # the error of a cancelled job's result
    TOO_MANY_DOCUMENTS = "too_many_documents"  # /v1/rerank: over gateway.rerank.max_documents
    DOCUMENT_TOO_LONG = "document_too_long"  # /v1/rerank: a document over gateway.rerank.max_document_chars
    QUERY_TOO_LONG = "query_too_long"  # /v1/rerank: the query over gateway.rerank.max_query_chars
    CONTENT_BLOCKED = "content_blocked"  # a safety policy's block action (docs/safety.md)
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # an upstream's own "prompt too long" 400, in OpenAI's shape


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatMessage(_Open):
    role: str = Field(..., min_length=1, max_length=64)
    content: str | list[Any] | None = None
    name: str | None = Field(default=None, max_length=256)


class _Generation(_Open):
    model: str = Field(..., min_length=1, max_length=256)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, description="at most `gateway.max_tokens_limit` (131072 by "
                                   "default), else 400 `max_tokens_too_large`")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = Field(default=None, max_length=256)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=100_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="bounded as `max_tokens`")


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)


class EmbeddingRequest(_Open):
    # absent or null: the inference capability's default embedding model (filled in before validation)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]] = Field(...)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    user: str | None = Field(default=None, max_length=256)


def check_embedding_input(value: str | list[str] | list[int] | list[list[int]]) -> None:
    """Refuse empty input (`""`, `[]`, `[""]`, `[[]]`), naming the index: an empty text embeds to a vector of
    special tokens only, a meaningless answer that looks like a real one."""
    if isinstance(value, str):
        if not value:
            raise BadRequest("input: must not be an empty string", code=CoreCode.INVALID_PARAMETER, param="input")
        return
    if not value:
        raise BadRequest("input: must not be an empty list", code=CoreCode.INVALID_PARAMETER, param="input")
    for i, item in enumerate(value):
        if isinstance(item, str | list) and not item:
            what = "string" if isinstance(item, str) else "token list"
            raise BadRequest(f"input[{i}]: must not be an empty {what}",
                             code=CoreCode.INVALID_PARAMETER, param=f"input[{i}]")


JobEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    endpoint: JobEndpoint = "/v1/chat/completions"
    body: dict[str, Any]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


# -- response models: documentation of what the endpoints answer (the OpenAPI contract) -------------
#
# The generation endpoints relay the upstream's body untouched, so these allow every other field and
# require only what OpenAI clients read; the job and model objects are the gateway's own.


class _Relayed(BaseModel):
    model_config = ConfigDict(extra="allow")


class CompletionUsage(_Relayed):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(_Relayed):
    role: str
    content: str | None = Field(default=None, description="null when the answer is only tool calls")


class ChatCompletionChoice(_Relayed):
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None = Field(description="stop, length, tool_calls, ...")


class ChatCompletion(_Relayed):
    """An OpenAI `chat.completion` object (the upstream's, relayed)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage | None = None


class CompletionChoice(_Relayed):
    index: int
    text: str
    finish_reason: str | None


class Completion(_Relayed):
    """An OpenAI `text_completion` object (the upstream's, relayed)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class Embedding(_Relayed):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="the vector; base64 of little-endian float32 with "
                                                     "`encoding_format: base64`")


class EmbeddingUsage(_Relayed):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Relayed):
    """An OpenAI embeddings list (an upstream's, relayed, or the local model's)."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class RerankDocument(_Open):
    text: str = Field(..., max_length=10_000_000, description="the document's text")


class RerankRequest(_Open):
    """`POST /v1/rerank` (vLLM, Jina and Cohere clients send this shape). Strict types; the limits on
    documents and characters are `gateway.rerank` settings (400 `too_many_documents`, `document_too_long`,
    `query_too_long`)."""

    model: str | None = Field(default=None, min_length=1, max_length=256, description=(
        "default: `gateway.rerank.default_model`, else the first local rerank model, else the default embedding "
        "model scoring by cosine (`method: bi-encoder`)"))
    query: str = Field(..., min_length=1)
    documents: list[str | RerankDocument] = Field(..., min_length=1, description="texts, or `{\"text\": ...}` objects")
    top_n: int | None = Field(default=None, ge=1, description="answer only the best `top_n` (default: all)")
    return_documents: bool | None = Field(default=None, description="include each document's text (default true)")


class RerankResult(_Relayed):
    index: int = Field(description="the document's position in the request")
    relevance_score: float = Field(description="cross-encoder: in (0, 1), higher is more relevant; bi-encoder: "
                                               "cosine similarity in [-1, 1]")
    document: RerankDocument | None = Field(default=None, description="with `return_documents` (the default)")


class RerankUsage(_Relayed):
    prompt_tokens: int | None = None
    total_tokens: int


class RerankResponse(_Relayed):
    """The results sorted by `relevance_score`, best first (vLLM/Jina/Cohere shape)."""

    id: str | None = None
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    method: Literal["cross-encoder", "bi-encoder"] = Field(description=(
        "how the scores were made: a cross-encoder (a local rerank model or an upstream), or, where no "
        "cross-encoder serves the model, cosine similarity of embeddings (never presented as a cross-encoder)"))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field(description="the upstreams that serve it (comma-separated), or `xcstack` for a local model")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobErrorDetail(_Relayed):
    """xcstack's own `{type, code, message}`, or the `error` member of an upstream's 4xx answer (relayed)."""

    type: str | None = None
    code: str | int | None = None
    message: str | None = None


class JobSummary(BaseModel):
    """A job as `POST /v1/jobs` answers it and `GET /v1/jobs` lists it (times are Unix seconds)."""

    id: str
    object: Literal["job"]
    status: JobStatus
    endpoint: JobEndpoint
    created_at: float
    metadata: dict[str, str] | None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = Field(default=None, description="a finished job is deleted then")
    attempts: int = 0
    http_status: int | None = Field(default=None, description="the status the call answered (finished jobs)")


class Job(JobSummary):
    """One job with its outcome: `result` is the endpoint's answer, `error` the error of a failed or cancelled one."""

    result: ChatCompletion | Completion | EmbeddingList | None = None
    error: JobErrorDetail | str | None = None


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobSummary] = Field(description="the caller's jobs, newest first (at most 100)")


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text in a request (for the token estimate before the call)."""
    chars = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, str):
                    chars += len(c)
                elif isinstance(c, list):
                    for part in c:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            chars += len(part["text"])
    for key in ("prompt", "input"):
        p = body.get(key)
        if isinstance(p, str):
            chars += len(p)
        elif isinstance(p, list):
            for item in p:
                if isinstance(item, str):
                    chars += len(item)
                elif isinstance(item, int):
                    chars += 4
                elif isinstance(item, list):
                    chars += 4 * len(item)
    return chars


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap upper-ish estimate: ~4 characters per token (CJK text is closer to 1-2; limits stay
    approximate until the actual usage is charged after the call)."""
    return max(1, prompt_chars(body) // 3)
