"""Wire schemas of `/v1/vectors/...`: the request models routes.py parses bodies with, and the answers
(documentation of the dicts the routes return) that the OpenAPI contract is generated from.

Requests are strict (a boolean is not a number, so `[[true, 0.5]]` is not the vector `[1, 0.5]`; a
number is not a string) and refuse unknown fields. Checks that need the collection or the settings
(dimension match, `max_top_k`, `max_batch`, `max_payload_fields`, reserved names, filter syntax) stay in
the service, with their own codes (docs/vectors.md, Errors). Strings stored or matched in the engine
hold no NUL character: PostgreSQL refuses it in text and jsonb (pgvector answered 500), so both engines
refuse it alike (400).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema


class VectorCode(StrEnum):
    """Stable error codes of the vector capability (docs/vectors.md, Errors)."""

    INVALID_COLLECTION_NAME = "invalid_collection_name"
    INVALID_VECTOR = "invalid_vector"
    INVALID_FILTER = "invalid_filter"
    FILTER_TOO_DEEP = "filter_too_deep"
    INVALID_ID = "invalid_id"
    DUPLICATE_ID = "duplicate_id"
    TOP_K_TOO_LARGE = "top_k_too_large"
    TOO_MANY_COLLECTIONS = "too_many_collections"
    EMBEDDING_UNAVAILABLE = "embedding_unavailable"
    COLLECTION_NOT_FOUND = "collection_not_found"
    COLLECTION_EXISTS = "collection_exists"
    VECTOR_POOL_EXHAUSTED = "vector_pool_exhausted"
    VECTOR_BACKEND_UNAVAILABLE = "vector_backend_unavailable"
    VECTOR_BACKEND_TIMEOUT = "vector_backend_timeout"


NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")  # collection names
FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # payload field names
MAX_ID_CHARS = 256
MAX_FILTER_CHARS = 4096
NO_NUL = r"^[^\x00]*$"
FIELD = FIELD_RE.pattern
MAX_DIMENSION = 32768  # the cap of `[vector] max_dimension` (settings.py); the configured value applies
MAX_VECTOR_VALUES = 32768
FLAG = r"^(?:[01]|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|[Nn][Oo])$"  # routes._FLAGS, any case

Metric = Literal["cosine", "l2", "ip"]
Vector = Annotated[
    list[float],
    Field(min_length=1, max_length=MAX_VECTOR_VALUES, description="finite numbers within float32 range"),
]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=NO_NUL)]
Filter = Annotated[
    str,
    Field(
        max_length=MAX_FILTER_CHARS,
        pattern=NO_NUL,
        description='filter expression (docs/vectors.md), e.g. `lang == "zh" and year >= 2020`; '
        "at most 32 levels of nesting",
    ),
]
PayloadKey = Annotated[str, Field(pattern=FIELD)]
Payload = Annotated[
    dict[PayloadKey, Any],
    Field(
        description="any JSON values, no NUL in strings; keys not `id`, `vector`, `score`, `distance`, "
        "`payload`; at most `[vector] max_payload_fields` keys"
    ),
]
OutputField = Annotated[str, Field(pattern=r"^(?:\*|[A-Za-z_][A-Za-z0-9_]{0,63})$")]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # absent, never null


def _has_nul(value: Any) -> bool:
    """A NUL in any string of a JSON value (iterative: payloads nest as deep as the JSON parser allows)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateCollection(_Strict):
    """Body of `POST /v1/vectors/collections`."""

    name: str = Field(pattern=NAME_RE.pattern, description="1-48 letters, digits and '_', starting with a letter")
    dimension: int = Field(
        ge=1, le=MAX_DIMENSION, description="at most `[vector] max_dimension` (default 4096; pgvector: 2000)"
    )
    metric: Metric | None = Field(default=None, description="null or absent: cosine")
    description: str | None = Field(default=None, max_length=1024, pattern=NO_NUL)


class UpsertRequest(_Strict):
    """Body of `POST /v1/vectors/{collection}/upsert`: `vectors` or `texts` (embedded by the local model),
    exactly one; `ids` and `payloads`, when given, one per row."""

    ids: list[Id] | None = Field(default=None, description="unique; generated (hex) when absent")
    vectors: list[Vector] | None = Field(default=None, min_length=1, description="rows of the collection's dimension")
    texts: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    payloads: list[Payload] | None = None
    model: str | None = Field(default=None, description="embedding model for `texts` (default: the configured one)")

    @field_validator("payloads")
    @classmethod
    def _payload_strings(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None and _has_nul(value):
            raise ValueError("payload strings must not contain NUL characters")
        return value


class SearchRequest(_Strict):
    """Body of `POST /v1/vectors/{collection}/search`: exactly one of `vector`, `vectors`, `text`, `texts`
    (the plural forms answer one list of hits per query)."""

    vector: Vector | None = None
    vectors: list[Vector] | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)
    texts: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    top_k: int = Field(default=10, ge=1, description="at most `[vector] max_top_k` (400 `top_k_too_large`)")
    filter: Filter | None = None
    output_fields: list[OutputField] | None = Field(
        default=None, max_length=256, description='payload keys to return (`["*"]`: all); none by default'
    )
    include_vectors: bool | None = Field(default=None, description="return each hit's vector")
    ef: int | None = Field(default=None, ge=1, le=32768, description="HNSW search breadth (raised to top_k)")
    model: str | None = Field(default=None, description="embedding model for `text`/`texts`")


class DeleteRequest(_Strict):
    """Body of `POST /v1/vectors/{collection}/delete`: `ids` and/or `filter` (both: rows matching both)."""

    ids: list[Annotated[str, Field(min_length=1, pattern=NO_NUL)]] | None = Field(default=None, min_length=1)
    filter: Filter | None = None


class ExportQuery(BaseModel):
    """Query of `GET /v1/vectors/{collection}/export` (query values are text: not strict)."""

    filter: Filter | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)
    vectors: str = Field(
        default="true", pattern=FLAG, description="include each row's vector: true/false, yes/no, 1/0 (any case)"
    )


# -- answers (documentation: the routes answer dicts built from the service's values) --------------
# No `extra="forbid"`: the index block has engine-specific keys, and a key added later must not
# break old clients.


class IndexInfo(BaseModel):
    """The collection's index: its state and engine-specific parameters."""

    type: str = Field(description="HNSW (or the configured Milvus index type)")
    state: Literal["ready", "building", "not_loaded", "none", "invalid"] = Field(
        description="`building`: an explicit build/load runs; Milvus `not_loaded`: not searchable yet; "
        "pgvector `none`: no index (searches scan), `invalid`: a failed build"
    )
    ef_search: int
    building_for_s: float | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default, description="while `building`"
    )
    params: dict[str, Any] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default, description="Milvus: the index parameters"
    )
    load_state: str | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default, description="Milvus: Loaded, Loading, NotLoad"
    )
    indexed_rows: int | None = Field(default=None, description="Milvus")
    pending_rows: int | None = Field(default=None, description="Milvus: rows not indexed yet")
    m: int | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default, description="pgvector")
    ef_construction: int | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default, description="pgvector"
    )


class CollectionInfo(BaseModel):
    """A collection: schema, row count and index state."""

    name: str
    dimension: int
    metric: Metric
    count: int | None = Field(description="rows (null where the engine cannot count)")
    description: str
    index: IndexInfo


class CollectionList(BaseModel):
    object: Literal["list"]
    data: list[str] = Field(description="collection names, sorted")


class CollectionDropped(BaseModel):
    name: str
    dropped: Literal[True]


class UpsertResult(BaseModel):
    upserted: int = Field(description="rows written")
    ids: list[str] = Field(description="the rows' ids, in order (generated ones included)")


class Hit(BaseModel):
    """One search hit; `payload` only with `output_fields`, `vector` only with `include_vectors`."""

    id: str
    score: float | None = Field(
        description="cosine similarity / inner product (higher is closer) or L2 distance (lower is closer); "
        "null where the engine cannot score (pgvector: a zero vector under cosine)"
    )
    payload: dict[str, Any] | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)
    vector: list[float] | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)


class SearchResult(BaseModel):
    object: Literal["search_result"]
    data: list[Hit] | list[list[Hit]] = Field(
        description="`vector`/`text`: the hits, best first; `vectors`/`texts`: one list of hits per query"
    )


class DeleteResult(BaseModel):
    deleted: int | None = Field(
        description="as the engine reports it (Milvus counts the ids asked for, deleted or not; null: unknown)"
    )
