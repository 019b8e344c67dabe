"""One typed settings model: an optional TOML file, overridden by `XC_*` environment variables.

Nested keys use `__` in env vars: `XC_SERVER__PORT=9000` overrides `[server] port`. Invalid config
fails at start-up with `ConfigError`, whose message names every bad key and the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from xcstack.console.settings import ConsoleSettings
from xcstack.crypto.settings import CryptoSettings
from xcstack.db.settings import DbSettings
from xcstack.gateway.settings import GatewaySettings
from xcstack.inference.settings import InferenceSettings
from xcstack.llm.settings import LLMSettings
from xcstack.safety.settings import SafetySettings
from xcstack.security.settings import SecuritySettings
from xcstack.supply.settings import SupplySettings
from xcstack.usage.settings import UsageSettings
from xcstack.vector.settings import VectorSettings


class ConfigError(Exception):
    """Raised at start-up for invalid configuration; the message names key and reason."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="listen address (one socket shared by all http workers)")
    port: int = Field(8000, ge=0, le=65535, description="listen port; 0 picks a free one")
    http_server: Literal["granian", "uvicorn"] = Field(
        "granian", description="granian measured faster (docs/benchmarks.md#http_stack); uvicorn is the fallback"
    )
    workers: int | None = Field(None, ge=1, le=512, description="http workers; default from the tuning plan")
    loop: Literal["auto", "uvloop", "asyncio"] = Field("auto", description="auto: uvloop where installed")
    backlog: int = Field(2048, ge=16, description="listen backlog (capped by net.core.somaxconn)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_url_bytes: int = Field(8192, ge=256, le=65536, description="longer request targets (path + query) get 414")
    max_header_bytes: int = Field(
        32 * 1024, ge=4096, le=1024 * 1024, description="larger request heads (target + all headers) get 431"
    )
    max_headers: int = Field(
        96, ge=16, le=99, description="more header fields get 431 (Granian's own hard limit is 100: it answers an "
        "empty 431 above that)"
    )
    idle_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a new connection that sends no byte within this time is closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a request head must be complete this long after its first byte, or on a "
        "kept-alive connection after the previous response (so it is also the keep-alive idle limit); else closed"
    )
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="time the client gets to send the whole request body (only the time the "
        "app waits for it counts); then 408 and the connection is closed"
    )
    graceful_timeout_s: float = Field(30.0, gt=0, description="SIGTERM/SIGHUP: time in-flight requests get")
    respawn_backoff_max_s: float = Field(10.0, gt=0, description="cap of the restart backoff of a crashing child")
    pin_cpus: bool = Field(True, description="apply the tuning plan's CPU affinity")
    worker_cpus: list[int] | None = Field(None, description="override: cores the http workers may use")
    plugins: list[str] = Field(
        default_factory=list, description="extra capability modules (`create(ctx)`), loaded after the built-in ones"
    )

    @field_validator("plugins")
    @classmethod
    def _importable(cls, v: list[str]) -> list[str]:
        for name in v:
            try:
                found = importlib.util.find_spec(name) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise ValueError(f"module {name!r} cannot be imported")
        return v


class ObservabilitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = Field(True, description="JSON lines on stderr (else plain text)")
    access_log: bool = Field(True, description="one log line per request, with its request id")
    loop_lag_interval_s: float = Field(0.05, gt=0, le=10, description="tick of the event-loop lag monitor")


class StateSettings(BaseModel):
    """xcstack's own state (users, keys, jobs, cursors)."""

    model_config = ConfigDict(extra="forbid")

    url: SecretStr | None = Field(
        None, description="postgresql://... (PostgreSQL or KingbaseES); default: SQLite under data_dir"
    )
    pool_size: int = Field(4, ge=1, le=64, description="threads (each with its own connection)")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            raw = v.get_secret_value()
            if not raw.startswith(("postgresql://", "postgres://", "sqlite:///")):
                raise ValueError("must start with postgresql:// or sqlite:///")
        return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="XC_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(Path("var"), description="state, models, audit log, keys, sockets")
    server: ServerSettings = ServerSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    state: StateSettings = StateSettings()
    gateway: GatewaySettings = GatewaySettings()
    inference: InferenceSettings = InferenceSettings()
    llm: LLMSettings = LLMSettings()
    vector: VectorSettings = VectorSettings()
    db: DbSettings = DbSettings()
    crypto: CryptoSettings = CryptoSettings()
    security: SecuritySettings = SecuritySettings()
    safety: SafetySettings = SafetySettings()
    supply: SupplySettings = SupplySettings()
    usage: UsageSettings = UsageSettings()
    console: ConsoleSettings = ConsoleSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the TOML file is `model_config["toml_file"]`: set only on the per-file subclass of `load_settings`
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


@functools.lru_cache(maxsize=16)
def _from_file(toml_path: Path) -> type[Settings]:
    """Settings that also read `toml_path` (below env and overrides); a subclass per file, so that
    loading shares no mutable state (the file is read at each instantiation)."""

    class FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": toml_path})

    return FileSettings


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; `path` (or `XC_CONFIG`) names an optional TOML file."""
    raw_path = path if path is not None else os.environ.get("XC_CONFIG")
    toml_path = Path(raw_path) if raw_path else None
    if toml_path is not None:
        if not toml_path.is_file():
            raise ConfigError(f"config file {toml_path}: not found")
        try:
            with toml_path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_path}: invalid TOML: {exc}") from exc
    try:
        if toml_path is None:
            return Settings(**overrides)
        loaded = _from_file(toml_path.resolve())(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, toml_path)) from None
    # a plain `Settings` (picklable, `type(s) is Settings`) with the values already validated
    return Settings.model_construct(loaded.model_fields_set, **{k: getattr(loaded, k) for k in Settings.model_fields})


def format_validation_error(exc: ValidationError, source: Path | None = None) -> str:
    where = f" (file {source}, env XC_*)" if source else " (env XC_*)"
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


_SECRET_WORDS = ("password", "secret", "token", "api_key", "apikey", "master_key", "dsn", "url")


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data, with every secret masked (for `config show`)."""
    data = settings.model_dump(mode="json")
    return _mask(data)


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if isinstance(value, str) and value and any(w in key.lower() for w in _SECRET_WORDS):
        return "**********"
    return value
