"""Settings of the security capability (the `[security]` table of the config file, XC_SECURITY__* env vars)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class AuditSettings(BaseModel):
    """`[security.audit]`: the SM3 hash-chained audit log."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(default=None, description="audit directory; default <data_dir>/audit")
    node: str = Field(default="", max_length=64, description="node name in chain ids; default: the host name")
    segment_max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, le=4 * 1024**3)
    rotate_interval_s: float = Field(default=86400.0, ge=1.0, le=31 * 86400.0)
    retention_days: int = Field(default=180, ge=180, le=36500, description="MLPS L3 requires at least 180 days")
    checkpoint_interval_s: float = Field(default=10.0, gt=0, le=3600)
    checkpoint_every_records: int = Field(default=10000, ge=1, le=10_000_000)
    max_pending: int = Field(default=100_000, ge=16, le=10_000_000, description="queued appends before 503")
    max_batch: int = Field(default=8192, ge=1, le=1_000_000)
    sync: Literal["fdatasync", "fsync"] = "fdatasync"
    durability: Literal["by_class", "strict"] = Field(
        default="by_class",
        description="by_class: security events are durable before the response, data-plane `api.call` records "
        "within data_plane_flush_ms without holding it; strict: every record before the response",
    )
    data_plane_flush_ms: float = Field(
        default=5.0, ge=0.1, le=1000.0,
        description="the longest a data-plane record waits for its group commit (what a crash can lose)",
    )
    log_api_calls: bool = Field(default=True, description="one record per authenticated API call")
    export_syslog: str | None = Field(default=None, description="tcp://host:port (RFC 5424 over TCP, octet counting)")
    export_http: str | None = Field(default=None, description="http(s)://collector/path: POST JSON batches")
    export_interval_s: float = Field(default=2.0, gt=0, le=3600)
    export_batch: int = Field(default=500, ge=1, le=100_000)
    export_timeout_s: float = Field(default=10.0, gt=0, le=300)
    on_integrity_failure: Literal["refuse", "read_only"] = Field(
        default="refuse",
        description="a chain that fails the start-up check (damage, or records no signed checkpoint covers): "
        "refuse to start, or leave it read-only, alert and write to a fresh chain (docs/security.md)",
    )
    startup_verify_max_bytes: int = Field(
        default=128 * 1024 * 1024, ge=0, le=1024**4,
        description="at start, hash-verify the whole chain up to this size; a larger one from the segment "
        "holding its last signed checkpoint (the rest is left to `xcstack audit verify`)",
    )

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("only letters, digits, '_', '.', '-'")
        return v

    @field_validator("export_syslog")
    @classmethod
    def _syslog(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"tcp://[^:/\s]+:\d{1,5}", v):
            raise ValueError("must look like tcp://host:port")
        return v

    @field_validator("export_http")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


class SecuritySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="authentication + RBAC + audit on every endpoint but health")
    # -- passwords --
    password_hash: Literal["pbkdf2-sm3", "argon2id"] = "pbkdf2-sm3"
    pbkdf2_iterations: int = Field(default=100_000, ge=100_000, le=10_000_000)
    password_min_length: int = Field(default=12, ge=8, le=256)
    password_min_classes: int = Field(default=3, ge=3, le=4, description="of lower/upper/digit/symbol")
    password_history: int = Field(default=5, ge=1, le=50, description="the last N passwords may not be reused")
    password_max_age_days: int = Field(default=90, ge=1, le=3650)
    admin_user: str = Field(default="admin", min_length=1, max_length=64)
    # -- second factor --
    totp_required: bool = Field(default=True, description="TOTP required for human accounts")
    totp_issuer: str = Field(default="xcstack", min_length=1, max_length=64)
    recovery_codes: int = Field(default=10, ge=1, le=50)
    # -- lockout --
    lockout_threshold: int = Field(default=5, ge=1, le=100)
    lockout_s: float = Field(default=900.0, ge=1.0, le=86400.0)
    redis_url: SecretStr | None = Field(default=None, description="redis://... to share lockout state across nodes")
    redis_prefix: str = Field(default="xc:sec:", min_length=1, max_length=64)
    # -- sessions and keys --
    session_idle_s: float = Field(default=900.0, ge=1.0, le=86400.0)
    session_absolute_s: float = Field(default=43200.0, ge=1.0, le=7 * 86400.0)
    api_key_max_days: int = Field(default=365, ge=1, le=3650)
    auth_cache_s: float = Field(default=1.0, ge=0, le=60, description="per-process cache of token checks")
    # -- http --
    public_paths: list[str] = Field(
        default_factory=lambda: ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"],
        description="paths served without authentication (health probes of load balancers)",
    )
    metrics_public: bool = Field(default=False, description="serve /metrics without authentication")
    trust_proxy_headers: bool = Field(default=False, description="take the client IP from X-Forwarded-For")
    # -- trusted boot --
    trust_manifest: Path | None = Field(default=None, description="default <data_dir>/trust/manifest.json")
    trust_paths: list[Path] = Field(default_factory=list, description="config files and model dirs to seal")
    trust_required: bool = Field(default=False, description="refuse to start when no manifest exists")
    trust_interval_s: float = Field(default=300.0, ge=1.0, le=86400.0)
    # -- keys --
    signing_key: str = Field(default="audit-sm2", min_length=1, max_length=128, description="SM2 key id for signatures")
    audit: AuditSettings = AuditSettings()

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("public_paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"{p!r}: must start with '/'")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> SecuritySettings:
        if self.session_absolute_s < self.session_idle_s:
            raise ValueError("session_absolute_s must be at least session_idle_s")
        return self
