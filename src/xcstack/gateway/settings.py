"""Settings of the gateway capability (the `[gateway]` table of the config file, XC_GATEWAY__* env vars).

Example:

```toml
[gateway]
max_in_flight = 1024

[[gateway.upstreams]]
name = "vllm-a"
base_url = "http://10.0.0.5:8000/v1"
api_key = "sk-..."
models = ["qwen2.5-7b"]
aliases = { "qwen" = "qwen2.5-7b" }
weight = 2
max_concurrency = 128

[gateway.upstreams.timeouts]
connect_s = 2
ttfb_s = 60
```
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_MODEL = re.compile(r"^[^\s]{1,256}$")


class TimeoutSettings(BaseModel):
    """Timeouts of one upstream, in seconds.

    - `connect_s`: TCP connect (and TLS handshake).
    - `ttfb_s`: from sending the request to the first byte of the answer: for streams, the first SSE
      event; for non-streamed requests, the response headers (a vLLM server sends those after the
      whole generation, so this bounds generation time there).
    - `idle_s`: the longest gap between two chunks of a stream.
    - `total_s`: the whole request, first byte to last.
    """

    model_config = ConfigDict(extra="forbid")

    connect_s: float = Field(default=2.0, gt=0, le=60)
    ttfb_s: float = Field(default=60.0, gt=0, le=3600)
    idle_s: float = Field(default=30.0, gt=0, le=3600)
    total_s: float = Field(default=600.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _order(self) -> TimeoutSettings:
        if self.total_s < self.connect_s:
            raise ValueError("total_s must be >= connect_s")
        return self


class UpstreamSettings(BaseModel):
    """One OpenAI-compatible upstream (vLLM, an xinference/TGI/SGLang server, a hosted API)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="unique name, used in metrics and logs")
    base_url: str = Field(..., description="the API root, ending in /v1 (e.g. http://127.0.0.1:8000/v1)")
    api_key: SecretStr | None = Field(default=None, description="sent as `Authorization: Bearer ...` to the upstream")
    models: list[str] = Field(..., min_length=1, max_length=1024, description="model names this upstream serves")
    aliases: dict[str, str] = Field(
        default_factory=dict, description="public name -> one of `models` (the name sent upstream)"
    )
    weight: float = Field(default=1.0, gt=0, le=1000)
    max_concurrency: int = Field(default=256, ge=1, le=100_000, description="requests in flight to this upstream")
    max_queue: int = Field(default=256, ge=0, le=100_000, description="requests waiting for a slot of this upstream")
    timeouts: TimeoutSettings = TimeoutSettings()
    recv_buffer_bytes: int = Field(
        default=32768, ge=0, le=64 * 1024 * 1024,
        description="SO_RCVBUF of upstream connections: bounds per-stream memory when clients are slow; "
        "0 lets the kernel auto-tune (better for large answers over high-latency links)",
    )
    embeddings: bool = Field(default=True, description="forward /v1/embeddings for this upstream's models")
    context_length: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="the context of one request (prompt + answer), in tokens, when known: `max_tokens` at or beyond it "
        "gets 400 `max_tokens_too_large` before the call (the local llm upstream sets it)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', ':', '-'")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return v.rstrip("/")

    @field_validator("recv_buffer_bytes")
    @classmethod
    def _rcvbuf(cls, v: int) -> int:
        if 0 < v < 4096:
            raise ValueError("must be 0 (kernel auto-tuning) or at least 4096")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        for m in v:
            if not _MODEL.match(m):
                raise ValueError(f"model name {m!r} must be 1-256 non-space characters")
        if len(set(v)) != len(v):
            raise ValueError("model names must be unique")
        return v

    @model_validator(mode="after")
    def _aliases(self) -> UpstreamSettings:
        for alias, target in self.aliases.items():
            if not _MODEL.match(alias):
                raise ValueError(f"alias {alias!r} must be 1-256 non-space characters")
            if target not in self.models:
                raise ValueError(f"alias {alias!r} points to {target!r}, which is not in models")
        return self


class BreakerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    failure_threshold: int = Field(default=5, ge=1, le=1000, description="consecutive failures that open the breaker")
    open_s: float = Field(default=10.0, gt=0, le=3600, description="how long it stays open before a half-open probe")


class RateLimitSettings(BaseModel):
    """Per API key limits (token buckets, one minute of capacity). 0 disables a limit."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int = Field(default=0, ge=0, le=10_000_000)
    tokens_per_minute: int = Field(default=0, ge=0, le=1_000_000_000)
    burst_s: float = Field(default=60.0, gt=0, le=3600, description="bucket capacity, in seconds of refill")
    per_key: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="key id -> (requests_per_minute, tokens_per_minute) overrides",
    )
    # The shared (Redis) limiter must never hold requests up: each call is bounded in time and in number,
    # and a breaker skips Redis while it fails; the per-node buckets decide meanwhile (fail open).
    redis_timeout_s: float = Field(
        default=0.2, gt=0, le=2, description="longest wait for one Redis limiter call (connect included), no retry"
    )
    redis_max_pending: int = Field(
        default=128, ge=1, le=100_000,
        description="Redis limiter calls in flight per worker (so also its connections); beyond: local buckets",
    )
    redis_breaker: BreakerSettings = Field(
        default_factory=lambda: BreakerSettings(failure_threshold=3, open_s=5.0),
        description="after failure_threshold consecutive Redis failures or timeouts, skip Redis for open_s "
        "(local buckets), then let one probe call through",
    )

    @field_validator("per_key")
    @classmethod
    def _per_key(cls, v: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for key, (rpm, tpm) in v.items():
            if rpm < 0 or tpm < 0:
                raise ValueError(f"per_key[{key!r}]: limits must be >= 0")
        return v


class RetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=3, ge=1, le=10, description="upstreams tried per request, first included")
    backoff_base_s: float = Field(default=0.02, ge=0, le=10)
    backoff_max_s: float = Field(default=0.5, ge=0, le=60)


class JobSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    store: Literal["state", "redis"] = Field(
        default="state",
        description="where jobs are kept: `state`, the state store (SQLite by default, PostgreSQL/KingbaseES with "
        "`[state] url`); `redis`, the Redis at `gateway.redis_url` (required), keys under `gateway.redis_prefix` + "
        "`jobs:`, shared by every node on it (Redis persistence, RDB/AOF, decides what a Redis restart keeps)",
    )
    concurrency: int = Field(default=4, ge=1, le=1024, description="jobs running at once per worker")
    max_queued: int = Field(default=10_000, ge=1, le=10_000_000, description="queued jobs before 503")
    ttl_s: float = Field(default=86_400.0, gt=0, le=90 * 86_400, description="finished jobs are kept this long")
    lease_s: float = Field(default=30.0, ge=1, le=3600, description="a running job silent this long is requeued")
    poll_s: float = Field(default=1.0, gt=0, le=60, description="how often to look for jobs queued elsewhere")


class RerankSettings(BaseModel):
    """`POST /v1/rerank` (and `/rerank`): which model answers without `model`, and the request limits."""

    model_config = ConfigDict(extra="forbid")

    default_model: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="the model of a request without `model` (a local rerank model, an upstream's model, or a local "
                    "embedding model); unset: the first local rerank model, else the default embedding model "
                    "(cosine, `method: bi-encoder`)",
    )
    max_documents: int = Field(default=1000, ge=1, le=100_000, description="documents per request")
    max_document_chars: int = Field(
        default=20_000, ge=1, le=10_000_000,
        description="characters per document (a cross-encoder reads at most its max_seq_length tokens of the pair)",
    )
    max_query_chars: int = Field(default=4_000, ge=1, le=1_000_000, description="characters of the query")


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    upstreams: list[UpstreamSettings] = Field(default_factory=list, max_length=1000)
    max_in_flight: int = Field(default=1024, ge=1, le=1_000_000, description="requests in flight in one worker")
    max_queue: int = Field(default=1024, ge=0, le=1_000_000, description="requests waiting for an in-flight slot")
    queue_timeout_s: float = Field(default=5.0, ge=0, le=600, description="longest wait for a slot before 503")
    max_tokens_limit: int = Field(default=131_072, ge=1, le=10_000_000, description="largest max_tokens accepted")
    max_sse_event_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    metrics_keys: int = Field(
        default=100, ge=0, le=100_000,
        description='per-API-key metric series: the first N keys a worker sees keep their own `key` label, later '
                    'ones count as `key="other"`; 0: no per-key series (`key="-"`)',
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description='redis://... shares rate limits (and, with jobs.store = "redis", the job queue) between instances',
    )
    redis_prefix: str = Field(default="xc:gw:", min_length=1, max_length=128)
    rate_limit: RateLimitSettings = RateLimitSettings()
    breaker: BreakerSettings = BreakerSettings()
    retry: RetrySettings = RetrySettings()
    jobs: JobSettings = JobSettings()
    rerank: RerankSettings = RerankSettings()

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _unique(self) -> GatewaySettings:
        names = [u.name for u in self.upstreams]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"upstream names must be unique: {sorted(dup)}")
        for u in self.upstreams:
            for alias in u.aliases:
                for other in self.upstreams:
                    if alias in other.models:
                        raise ValueError(f"alias {alias!r} of upstream {u.name!r} shadows a model of {other.name!r}")
        return self

    @model_validator(mode="after")
    def _jobs_store(self) -> GatewaySettings:
        if self.jobs.enabled and self.jobs.store == "redis" and self.redis_url is None:
            # A ValidationError raised here keeps its location: the message names gateway.jobs.store.
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("jobs_store", '"redis" needs gateway.redis_url (the Redis that holds '
                                         'the jobs); set it, or use store = "state"'),
                loc=("jobs", "store"), input=self.jobs.store)])
        return self
