"""Settings of the db capability (the `[db]` table of the config file, XC_DB__* env vars).

```toml
[db.databases.main]
driver = "postgres"                  # sqlite | postgres | kingbase | mysql | mysqlclient | dm | gbase8s
dsn = "postgresql://app@127.0.0.1/app"
pool_size = 8

[db.databases.main.queries.user_by_id]
sql = "SELECT id, name FROM users WHERE id = :id"
params = { id = { type = "int", min = 1 } }
max_rows = 1
permission = "query:main/user_by_id"   # optional; this is the default
```

SQL uses `:name` placeholders whatever the driver; the driver profile rewrites them into the
driver's own paramstyle. Clients never send SQL: only a query name and its parameters.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DriverName = Literal["sqlite", "postgres", "kingbase", "mysql", "mysqlclient", "dm", "gbase8s"]
ParamType = Literal["int", "float", "decimal", "str", "bool", "date", "datetime", "time", "uuid"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _check_name(v: str, what: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"{what} {v!r}: letters, digits, '_' and '-', starting with a letter, at most 64")
    return v


class ParamSpec(BaseModel):
    """One parameter of a named query: its type and bounds. Unknown parameters are rejected."""

    model_config = ConfigDict(extra="forbid")

    type: ParamType = "str"
    required: bool = True
    nullable: bool = False
    default: Any = None
    min: float | None = Field(None, description="numbers: smallest allowed value")
    max: float | None = Field(None, description="numbers: largest allowed value")
    min_length: int | None = Field(None, ge=0)
    max_length: int | None = Field(1024, ge=1, le=16 * 1024 * 1024, description="str: longest allowed")
    pattern: str | None = Field(None, description="str: a regular expression the whole value must match")
    enum: list[Any] | None = Field(None, min_length=1, max_length=1000)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError("min_length is greater than max_length")
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float", "decimal"):
            raise ValueError(f"min/max apply to numbers, not to type {self.type}")
        if self.default is not None and self.required:
            raise ValueError("a parameter with a default must have required = false")
        return self


class QuerySettings(BaseModel):
    """A named query: SQL (or several statements run as one transaction), parameters, limits."""

    model_config = ConfigDict(extra="forbid")

    sql: str | None = Field(None, max_length=65536, description="one statement with :name placeholders")
    statements: list[str] | None = Field(
        None, min_length=1, max_length=64, description="a named transaction: run in order on one connection"
    )
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    max_rows: int = Field(1000, ge=1, le=1_000_000, description="JSON responses: row cap (truncated beyond)")
    stream_max_rows: int = Field(1_000_000, ge=1, le=100_000_000, description="NDJSON streams: row cap")
    permission: str | None = Field(
        None, max_length=200, description="resource checked with action 'execute'; default query:<db>/<name>"
    )
    timeout_s: float | None = Field(None, gt=0, le=3600, description="default: the database's query_timeout_s")
    read_only: bool | None = Field(
        None, description="safe to retry on a lost connection; default: true for a single SELECT/WITH/VALUES"
    )
    shard_key: str | None = Field(None, description="parameter whose value picks the shard")
    fan_out: bool = Field(
        False, description="sharded databases: run on every shard at once and concatenate the rows (read-only)"
    )
    description: str = Field("", max_length=2000)

    @model_validator(mode="after")
    def _check(self) -> QuerySettings:
        if (self.sql is None) == (self.statements is None):
            raise ValueError("give exactly one of sql or statements")
        for stmt in self.all_statements():
            if not stmt.strip():
                raise ValueError("empty SQL statement")
        for name in self.params:
            if not _PARAM_NAME.match(name):
                raise ValueError(f"parameter name {name!r}: letters, digits and '_' only")
        if self.shard_key is not None and self.shard_key not in self.params:
            raise ValueError(f"shard_key {self.shard_key!r} is not one of the parameters")
        if self.shard_key is not None and not self.params[self.shard_key].required:
            raise ValueError(f"shard_key {self.shard_key!r} must be a required parameter")
        if self.fan_out and self.shard_key is not None:
            raise ValueError("give shard_key or fan_out, not both")
        if self.fan_out and not self.is_read_only():
            raise ValueError("fan_out queries must be read-only (a write would run on every shard)")
        return self

    def all_statements(self) -> list[str]:
        return list(self.statements) if self.statements is not None else [self.sql or ""]

    def is_read_only(self) -> bool:
        if self.read_only is not None:
            return self.read_only
        if self.statements is not None:
            return False
        head = (self.sql or "").lstrip().split(None, 1)
        return bool(head) and head[0].upper() in ("SELECT", "WITH", "VALUES", "SHOW") and not re.search(
            r"\bFOR\s+(UPDATE|SHARE)\b|\b(INSERT|UPDATE|DELETE|MERGE)\b", self.sql or "", re.I
        )


class DatabaseSettings(BaseModel):
    """One configured database: its driver, where it is (one DSN or one per shard) and its pool."""

    model_config = ConfigDict(extra="forbid")

    driver: DriverName = "sqlite"
    dsn: SecretStr | None = Field(None, description="driver-specific DSN (URL form for mysql/dm); secret")
    shards: list[SecretStr] | None = Field(None, min_length=1, max_length=1024, description="one DSN per shard")
    pool_size: int = Field(
        4, ge=1, le=256,
        description="threads = connections per shard, per process. A process's workers share one GIL (and, as "
        "`xcstack serve` pins http workers, one core): a few threads keep it busy while the others wait on the "
        "server. bench/db.py, c=64: pool 8 gave more throughput than 4 but a higher loop lag p99 (MariaDB "
        "5.0 ms vs 0.7 ms). Raise it for slow, server-bound queries",
    )
    pool_wait_timeout_s: float = Field(1.0, gt=0, le=60, description="wait for a free connection, then 503")
    max_waiting: int = Field(1024, ge=0, le=1_000_000, description="callers allowed to wait; beyond: 503 at once")
    query_timeout_s: float = Field(30.0, gt=0, le=3600)
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    reconnect_backoff_initial_s: float = Field(0.05, gt=0, le=60)
    reconnect_backoff_max_s: float = Field(5.0, gt=0, le=600)
    retries: int = Field(1, ge=0, le=5, description="re-runs of a read-only query after a lost connection")
    stream_batch_rows: int = Field(500, ge=1, le=100_000, description="rows fetched per batch when streaming")
    stream_idle_timeout_s: float = Field(30.0, gt=0, le=3600, description="slow stream consumer: give up")
    health_interval_s: float = Field(30.0, ge=0, le=3600, description="ping idle connections; 0: never")
    transaction_idle_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a transaction idle this long between statements is rolled back"
    )
    prepare_statements: bool = Field(
        True, description="postgres: server-side prepared statements for repeated queries; false behind "
        "a transaction-mode connection pooler (pgbouncer)",
    )
    worker_nice: int = Field(
        0, ge=0, le=19,
        description="Linux: worker threads run this much nicer than the process. Off by default: a nicer "
        "worker preempted while it holds the GIL stalls the loop and every other worker (pool 4, c=64, "
        "PostgreSQL: nice 5 gave 11-12k q/s at 4.3 context switches per query on one pinned core, nice 0 "
        "16-18k at 1.1; unpinned 5.4-7.2k vs 8.9-10k)",
    )
    application_name: str = Field("xcstack", max_length=60)
    queries: dict[str, QuerySettings] = Field(default_factory=dict)

    @field_validator("queries")
    @classmethod
    def _names(cls, v: dict[str, QuerySettings]) -> dict[str, QuerySettings]:
        for name in v:
            _check_name(name, "query name")
        return v

    @model_validator(mode="after")
    def _check(self) -> DatabaseSettings:
        if self.dsn is None and not self.shards:
            if self.driver != "sqlite":
                raise ValueError(f"driver {self.driver} needs dsn or shards")
        if self.dsn is not None and self.shards:
            raise ValueError("give dsn or shards, not both")
        if self.reconnect_backoff_initial_s > self.reconnect_backoff_max_s:
            raise ValueError("reconnect_backoff_initial_s is greater than reconnect_backoff_max_s")
        if self.shards and len(self.shards) > 1:
            for qname, q in self.queries.items():
                if q.shard_key is None and not q.fan_out:
                    raise ValueError(f"queries.{qname}: a sharded database needs shard_key (or fan_out) on every query")
        return self

    def shard_dsns(self) -> list[str]:
        if self.shards:
            return [s.get_secret_value() for s in self.shards]
        if self.dsn is not None:
            return [self.dsn.get_secret_value()]
        return [":memory:"]


class DbSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    databases: dict[str, DatabaseSettings] = Field(default_factory=dict)
    max_body_bytes: int = Field(1024 * 1024, ge=256, le=64 * 1024 * 1024, description="request body limit")

    @field_validator("databases")
    @classmethod
    def _names(cls, v: dict[str, DatabaseSettings]) -> dict[str, DatabaseSettings]:
        for name in v:
            _check_name(name, "database name")
        return v
