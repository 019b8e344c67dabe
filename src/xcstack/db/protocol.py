"""Wire schemas of the db capability: what crosses the HTTP boundary, and how rows become JSON."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool

from xcstack.db.settings import ParamSpec


class DbCode(StrEnum):
    """Stable error codes of the db capability (docs/db.md, Errors)."""

    UNKNOWN_DATABASE = "unknown_database"
    UNKNOWN_QUERY = "unknown_query"
    INVALID_PARAMETER_VALUE = "invalid_parameter_value"
    NOT_STREAMABLE = "not_streamable"
    SHARD_KEY = "shard_key"
    SHARD_MISMATCH = "shard_mismatch"
    NESTED_TRANSACTION = "nested_transaction"
    TRANSACTION_CLOSED = "transaction_closed"
    CONSTRAINT_VIOLATION = "constraint_violation"
    DB_POOL_EXHAUSTED = "db_pool_exhausted"
    DB_UNAVAILABLE = "db_unavailable"
    DB_CONNECTION_LOST = "db_connection_lost"
    DB_CONFLICT = "db_conflict"
    QUERY_TIMEOUT = "query_timeout"
    QUERY_INVALID = "query_invalid"
    DB_ERROR = "db_error"
    STREAM_IDLE_TIMEOUT = "stream_idle_timeout"
    ROW_CAP_REACHED = "row_cap_reached"  # the tail line of a stream cut at max_rows


NDJSON = "application/x-ndjson"


class QueryRequest(BaseModel):
    """Body of `POST /v1/db/{database}/{query}`. Clients send a query name and parameters, never SQL."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(
        default_factory=dict, description="the query's parameters (GET /v1/db/{database}/{query} lists them)")
    stream: StrictBool = Field(False, description="NDJSON rows with backpressure (also: Accept: application/x-ndjson)")


# --- responses, for the API contract (the routes answer dicts; these describe them) ------------------
class QueryRows(BaseModel):
    """A statement with a result set: its rows as objects keyed by column (repeated names get `_2`, ...)."""

    database: str
    query: str
    columns: list[str]
    rows: list[dict[str, Any]] = Field(description="decimals as strings, bytes base64, dates ISO 8601")
    row_count: int
    truncated: bool = Field(description="true when the query's `max_rows` cut the result")


class QueryRowcount(BaseModel):
    """A statement without a result set (a write): the rows it affected."""

    database: str
    query: str
    rowcount: int = Field(description="as the driver reports it (-1: unknown)")


class QueryResponse(RootModel[QueryRows | QueryRowcount]):
    """What `POST /v1/db/{database}/{query}` answers as JSON."""


class QueryContract(BaseModel):
    """A named query's contract: its parameters and limits, never its SQL."""

    database: str
    query: str
    description: str
    params: dict[str, ParamSpec]
    read_only: bool
    max_rows: int
    stream_max_rows: int
    timeout_s: float
    transaction: bool = Field(description="several statements run as one transaction")
    shard_key: str | None


class DatabaseQueries(BaseModel):
    name: str
    driver: str
    shards: int
    queries: list[str]


class DatabaseList(BaseModel):
    databases: list[DatabaseQueries]


def _default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)  # exact: a float would lose digits
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, uuid.UUID | dt.date | dt.time):
        return v.isoformat() if not isinstance(v, uuid.UUID) else str(v)
    if isinstance(v, set | frozenset):
        return sorted(v, key=str)
    return str(v)


try:
    import orjson

    _OPTS = orjson.OPT_NON_STR_KEYS

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=_default, option=_OPTS)

except ImportError:  # LoongArch: no orjson wheel
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=_default, ensure_ascii=False, separators=(",", ":")).encode()


def unique_columns(columns: list[str]) -> list[str]:
    """Column names as JSON keys: a repeated name gets a suffix (`id`, `id_2`) instead of being lost."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for c in columns:
        name = str(c)
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
            while name in seen:
                name += "_"
        seen.setdefault(name, 1)
        out.append(name)
    return out
