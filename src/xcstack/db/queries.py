"""Named queries: compiled once at start-up, parameters validated on every call.

The validator is hand-written (not a pydantic model per query) because it runs on every request
and sits in the bridge's measured overhead; it is strict: JSON types must match (a string is not
an int), unknown parameters are rejected, bounds and patterns are enforced, NUL characters refused.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from xcstack.db.profiles import DriverProfile
from xcstack.db.settings import ParamSpec, QuerySettings
from xcstack.db.sqlparams import CompiledSQL, SQLTemplateError
from xcstack.errors import BadRequest, CoreCode

_INT64 = (-(2**63), 2**63 - 1)
_MISSING = object()


def _bad(name: str, why: str) -> BadRequest:
    return BadRequest(f"parameter {name!r}: {why}", code=CoreCode.INVALID_PARAMETER, param=f"params.{name}")


def _make_checker(name: str, spec: ParamSpec) -> Callable[[Any], Any]:
    t = spec.type
    pattern = re.compile(spec.pattern) if spec.pattern else None
    enum = list(spec.enum) if spec.enum is not None else None
    lo, hi = spec.min, spec.max

    def bounds(v: float | int | Decimal) -> None:
        if lo is not None and v < lo:
            raise _bad(name, f"must be >= {_num(lo)}")
        if hi is not None and v > hi:
            raise _bad(name, f"must be <= {_num(hi)}")

    def check(v: Any) -> Any:
        if t == "int":
            if not isinstance(v, int) or isinstance(v, bool):
                raise _bad(name, "must be an integer")
            if not _INT64[0] <= v <= _INT64[1]:
                raise _bad(name, "is outside the 64-bit integer range")
            bounds(v)
        elif t == "float":
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise _bad(name, "must be a number")
            v = float(v)
            if not math.isfinite(v):
                raise _bad(name, "must be finite")
            bounds(v)
        elif t == "decimal":
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                raise _bad(name, "must be a number or a numeric string")
            try:
                v = Decimal(str(v))
            except InvalidOperation:
                raise _bad(name, "is not a valid decimal number") from None
            if not v.is_finite():
                raise _bad(name, "must be finite")
            bounds(v)
        elif t == "bool":
            if not isinstance(v, bool):
                raise _bad(name, "must be true or false")
        elif t == "str":
            if not isinstance(v, str):
                raise _bad(name, "must be a string")
            if "\x00" in v:
                raise _bad(name, "must not contain NUL characters")
            if spec.max_length is not None and len(v) > spec.max_length:
                raise _bad(name, f"is longer than {spec.max_length} characters")
            if spec.min_length is not None and len(v) < spec.min_length:
                raise _bad(name, f"is shorter than {spec.min_length} characters")
            if pattern is not None and not pattern.fullmatch(v):
                raise _bad(name, f"does not match the pattern {spec.pattern}")
        else:
            if not isinstance(v, str) or len(v) > 64:
                raise _bad(name, f"must be an ISO {t} string")
            try:
                if t == "date":
                    v = dt.date.fromisoformat(v)
                elif t == "datetime":
                    v = dt.datetime.fromisoformat(v)
                elif t == "time":
                    v = dt.time.fromisoformat(v)
                elif t == "uuid":
                    v = str(uuid.UUID(v))
            except ValueError:
                raise _bad(name, f"is not a valid {t}") from None
        if enum is not None and v not in enum:
            raise _bad(name, f"must be one of {enum}")
        return v

    return check


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass
class NamedQuery:
    database: str
    name: str
    settings: QuerySettings
    statements: list[CompiledSQL]
    permission: str
    timeout_s: float
    read_only: bool
    max_rows: int
    stream_max_rows: int
    shard_key: str | None
    checkers: dict[str, tuple[ParamSpec, Callable[[Any], Any]]]

    @classmethod
    def build(
        cls, database: str, name: str, q: QuerySettings, profile: DriverProfile, default_timeout: float
    ) -> NamedQuery:
        compiled: list[CompiledSQL] = []
        for i, stmt in enumerate(q.all_statements()):
            try:
                c = profile.compile(stmt)
            except SQLTemplateError as exc:
                raise ValueError(f"db.databases.{database}.queries.{name}: statement {i + 1}: {exc}") from None
            unknown = c.names - set(q.params)
            if unknown:
                raise ValueError(
                    f"db.databases.{database}.queries.{name}: placeholder(s) {sorted(unknown)} are not declared "
                    "in params"
                )
            compiled.append(c)
        checkers = {p: (spec, _make_checker(p, spec)) for p, spec in q.params.items()}
        for spec, check in checkers.values():
            if spec.default is not None:
                try:
                    check(spec.default)
                except BadRequest as exc:
                    raise ValueError(f"db.databases.{database}.queries.{name}: default of {exc.message}") from None
        return cls(
            database=database,
            name=name,
            settings=q,
            statements=compiled,
            permission=q.permission or f"query:{database}/{name}",
            timeout_s=q.timeout_s or default_timeout,
            read_only=q.is_read_only(),
            max_rows=q.max_rows,
            stream_max_rows=q.stream_max_rows,
            shard_key=q.shard_key,
            checkers=checkers,
        )

    def validate(self, params: Any) -> dict[str, Any]:
        """Checked and converted parameters; BadRequest (400 invalid_parameter) names the bad one."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise BadRequest("params must be a JSON object", code=CoreCode.INVALID_PARAMETER, param="params")
        out: dict[str, Any] = {}
        for p, (spec, check) in self.checkers.items():
            v = params.get(p, _MISSING)
            if v is _MISSING:
                if spec.required:
                    raise _bad(p, "is required")
                out[p] = None if spec.default is None else check(spec.default)
                continue
            if v is None:
                if not spec.nullable:
                    raise _bad(p, "must not be null")
                out[p] = None
                continue
            out[p] = check(v)
        if len(params) > len(out) or any(k not in self.checkers for k in params):
            extra = sorted(k for k in params if k not in self.checkers)
            raise BadRequest(
                f"unknown parameter(s) {extra[:5]}; query {self.database}/{self.name} takes {sorted(self.checkers)}",
                code=CoreCode.INVALID_PARAMETER,
                param=f"params.{extra[0]}" if extra else "params",
            )
        return out
