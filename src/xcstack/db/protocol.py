"""Wire schemas of the db capability: what crosses the HTTP boundary, and how rows become JSON."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from xcstack.db.bridge import QueryResult
from xcstack.db.profiles import Row

NDJSON = "application/x-ndjson"


class QueryRequest(BaseModel):
    """Body of `POST /v1/db/{database}/{query}`. Clients send a query name and parameters, never SQL."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = Field(False, description="NDJSON rows with backpressure (also: Accept: application/x-ndjson)")


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


def rows_as_objects(columns: list[str], rows: list[Row]) -> list[dict[str, Any]]:
    return [dict(zip(columns, r, strict=False)) for r in rows]


def result_body(database: str, query: str, result: QueryResult) -> dict[str, Any]:
    if result.columns is None:
        return {"database": database, "query": query, "rowcount": result.rowcount}
    cols = unique_columns(result.columns)
    return {
        "database": database,
        "query": query,
        "columns": cols,
        "rows": rows_as_objects(cols, result.rows),
        "row_count": len(result.rows),
        "truncated": result.truncated,
    }
