"""The `[usage]` section: quotas, prices, counters and the ledger (docs/usage.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from xcstack.timezones import TimeZoneName

Scope = Literal["key", "user", "group"]
Metric = Literal["requests", "input_tokens", "output_tokens", "total_tokens", "cost"]
Period = Literal["day", "month"]


class QuotaRule(BaseModel):
    """One quota: `limit` of `metric` per calendar `period` for a key, a user or a group (`subject`; `*`:
    each subject of that scope on its own). Hard quotas refuse (429), soft ones alert at 80% and 100%.
    Cost limits are in the price table's currency."""

    model_config = ConfigDict(extra="forbid")

    scope: Scope
    subject: str = Field(min_length=1, max_length=200)
    metric: Metric
    period: Period
    limit: float = Field(ge=0)
    hard: bool = True


class Price(BaseModel):
    """What a model costs per million tokens, in `[usage] currency`."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class UsageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    timezone: TimeZoneName = "Asia/Shanghai"  # calendar days and months of the quotas and the daily roll-ups
    currency: str = "CNY"
    prices: dict[str, Price] = {}  # model -> price; the table's version is its hash (kept with each record)
    quotas: list[QuotaRule] = []  # from config; more are added through POST /v1/quotas (state store)
    output_reserve_tokens: int = Field(256, ge=0)  # reserved for output when a request sets no max_tokens
    # counters: in process (one node), or Redis shared by every node
    redis_url: SecretStr | None = None
    redis_prefix: str = "xc:usage:"
    redis_timeout_s: float = Field(0.5, gt=0)
    redis_retry_s: float = Field(2.0, ge=0)  # after a failure, Redis is skipped this long
    on_counter_failure: Literal["open", "closed"] = "open"  # Redis down: per-node counters (open) or 503
    rules_reload_s: float = Field(5.0, gt=0)  # how soon a quota another node added applies here
    # the ledger
    ledger_flush_ms: int = Field(200, ge=1, le=60_000)  # a record is durable within this (plus one write)
    ledger_batch_max: int = Field(2000, ge=1, le=100_000)
    ledger_queue_max: int = Field(100_000, ge=1)  # beyond: records are dropped and counted
    retention_days: int = Field(400, ge=1)  # raw records; the roll-ups are kept
    max_range_days: dict[str, int] = {"hour": 31, "day": 400, "month": 1830}
