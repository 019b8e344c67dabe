"""Settings of the vector capability (the `[vector]` table of the config file, XC_VECTOR__* env vars).

```toml
[vector]
backend = "milvus"            # or "pgvector"
max_top_k = 100
[vector.milvus]
# uri unset: Milvus Lite, embedded, under <data_dir>/vectors/milvus.db
uri = "http://milvus:19530"   # standalone or cluster: the same code path
[vector.pgvector]
url = "postgresql://user@host/db"
```
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class MilvusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: SecretStr | None = Field(
        default=None,
        description="http(s)://host:19530 for Milvus standalone/cluster, or a path ending in .db for Milvus "
        "Lite; default: Milvus Lite under <data_dir>/vectors/milvus.db",
    )
    token: SecretStr | None = Field(default=None, description="user:password or an API token")
    db_name: str = Field(default="", max_length=64, description="Milvus database; empty: the server's default")
    lite_mode: Literal["auto", "in_process", "side_process"] = Field(
        default="auto",
        description="Milvus Lite only. side_process: the supervisor runs one Lite server process that every "
        "http worker connects to (a Lite database can be opened by one process only). in_process: the worker "
        "runs the Lite server itself (one worker only). auto: side process under `xcstack serve`; a worker "
        "uses it when it listens on lite_port, else runs Lite in-process (tests, scripts)",
    )
    lite_port: int = Field(default=19531, ge=1024, le=65535, description="127.0.0.1 port of the Lite side process")
    pool_size: int = Field(default=4, ge=1, le=64, description="threads running blocking pymilvus calls")
    index_type: Literal["HNSW", "FLAT", "IVF_FLAT"] = "HNSW"
    m: int = Field(default=16, ge=2, le=100, description="HNSW M")
    ef_construction: int = Field(default=64, ge=8, le=2048, description="HNSW efConstruction")
    ef_search: int = Field(default=64, ge=1, le=32768, description="default HNSW ef at search time")
    load_on_start: bool = Field(
        default=True, description="load (Lite: build the index of) every collection at start; /readyz waits for it"
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            raw = v.get_secret_value()
            if not (raw.startswith(("http://", "https://", "tcp://", "grpc://")) or raw.endswith(".db")):
                raise ValueError("must be http(s)://host:port (Milvus server) or a path ending in .db (Milvus Lite)")
        return v


class PgvectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: SecretStr | None = Field(default=None, description="postgresql://... of a server with the vector extension")
    db_schema: str = Field(default="public", description="schema for the catalog and collection tables")
    pool_min: int = Field(default=1, ge=0, le=64)
    pool_max: int = Field(default=8, ge=1, le=256)
    m: int = Field(default=16, ge=2, le=100, description="HNSW m")
    ef_construction: int = Field(default=64, ge=4, le=1000, description="HNSW ef_construction")
    ef_search: int = Field(default=40, ge=1, le=1000, description="default hnsw.ef_search")
    iterative_scan: Literal["off", "relaxed_order", "strict_order"] = Field(
        default="relaxed_order", description="hnsw.iterative_scan for filtered searches (pgvector >= 0.8)"
    )
    create_extension: bool = Field(default=True, description="CREATE EXTENSION IF NOT EXISTS vector at start")
    index_on_create: bool = Field(
        default=True,
        description="create the HNSW index with the collection (maintained on every insert); False: bulk-load "
        "first, then POST /v1/vectors/collections/{name}/index builds it (CREATE INDEX is several times faster)",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return v

    @field_validator("db_schema")
    @classmethod
    def _schema(cls, v: str) -> str:
        if not _SCHEMA_RE.match(v):
            raise ValueError("must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 chars)")
        return v

    @model_validator(mode="after")
    def _pool(self) -> PgvectorSettings:
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min must be <= pool_max")
        return self


class VectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    backend: Literal["milvus", "pgvector"] = "milvus"
    max_top_k: int = Field(default=100, ge=1, le=16384, description="the largest top_k a search may ask for")
    max_batch: int = Field(default=1000, ge=1, le=100_000, description="rows per upsert/delete/search request")
    max_dimension: int = Field(default=4096, ge=1, le=32768)
    max_collections: int = Field(default=1000, ge=1, le=100_000)
    max_payload_fields: int = Field(default=64, ge=0, le=1024, description="payload keys per row")
    acquire_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="wait for a pool slot/connection; then 503 vector_pool_exhausted"
    )
    op_timeout_s: float = Field(
        default=30.0, ge=0.01, le=3600, description="one backend operation (search, upsert, ...)"
    )
    health_interval_s: float = Field(default=1.0, gt=0, le=300, description="backend health check period")
    embedding_model: str | None = Field(
        default=None, max_length=256, description="model for text input (None: the inference capability's default)"
    )
    milvus: MilvusSettings = MilvusSettings()
    pgvector: PgvectorSettings = PgvectorSettings()

    @model_validator(mode="after")
    def _backend_config(self) -> VectorSettings:
        if self.enabled and self.backend == "pgvector" and self.pgvector.url is None:
            raise ValueError("backend 'pgvector' needs vector.pgvector.url (postgresql://...)")
        return self
