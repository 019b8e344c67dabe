"""What a route tells its API contract: `@api(...)` marks an endpoint with its request and response
models, and `openapi.py` turns the marks of every mounted route into the OpenAPI document.

The marks sit next to `@requires` on the endpoint itself, so a route and its contract cannot drift
apart: the schema is built from the very pydantic models the route parses its input with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

F = TypeVar("F")

#: A response or request schema: a pydantic model, or a JSON schema written as a dict.
Schema = type[BaseModel] | Mapping[str, Any]

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class ApiDoc:
    """The contract of one endpoint (one HTTP method of a route)."""

    summary: str
    body: Schema | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    response: Schema | None = None
    status: int = 200
    #: other media types the success answer may come as (`text/event-stream` for `stream: true`)
    streams: Mapping[str, str] = field(default_factory=dict)
    #: a raw (non-JSON) request body media type accepted besides JSON, with its description
    raw_body: Mapping[str, str] = field(default_factory=dict)
    #: statuses answered with a body other than the error model (e.g. /readyz's 503), with its schema
    also: Mapping[int, Schema] = field(default_factory=dict)
    #: statuses this endpoint answers besides the common ones (400, 401, 403, 413, 429, 503)
    errors: tuple[int, ...] = ()
    #: permissions checked inside the endpoint (e.g. `model:<name> invoke`), in words
    checks: str = ""
    description: str = ""
    tag: str = ""
    #: "kserve": errors come as KServe v2 clients read them (`{"error": "<message>", "code", "type"}`)
    error_model: str = "xcstack"


def api(summary: str, **kwargs: Any) -> Callable[[F], F]:
    """Mark an endpoint with its contract; see `ApiDoc` for the fields."""
    doc = ApiDoc(summary, **kwargs)

    def mark(fn: F) -> F:
        existing = dict(getattr(fn, "__xc_api__", {}) or {})
        existing["*"] = doc
        fn.__xc_api__ = existing  # type: ignore[attr-defined]
        return fn

    return mark


def api_for(method: str, endpoint: Any, doc: ApiDoc) -> None:
    """Attach a contract for one method of an endpoint that serves several (or a callable object)."""
    existing = dict(getattr(endpoint, "__xc_api__", {}) or {})
    existing[method.upper()] = doc
    try:
        endpoint.__xc_api__ = existing
    except AttributeError:  # bound methods: mark the function behind them
        endpoint.__func__.__xc_api__ = existing


def doc_of(endpoint: Any, method: str) -> ApiDoc | None:
    marks: Mapping[str, ApiDoc] | None = getattr(endpoint, "__xc_api__", None)
    if not marks:
        return None
    return marks.get(method.upper()) or marks.get("*")
