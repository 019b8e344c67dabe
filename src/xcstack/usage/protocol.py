"""Wire models of the usage API and its error codes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xcstack.usage.settings import Metric, Period, Scope


class UsageCode(StrEnum):
    QUOTA_EXCEEDED = "quota_exceeded"
    QUOTA_COUNTERS_UNAVAILABLE = "quota_counters_unavailable"
    UNKNOWN_GROUP = "unknown_group"
    UNKNOWN_SUBJECT = "unknown_subject"
    INVALID_QUOTA = "invalid_quota"
    QUOTA_NOT_FOUND = "quota_not_found"
    INVALID_PERIOD = "invalid_period"
    INVALID_RANGE = "invalid_range"
    RANGE_TOO_LARGE = "range_too_large"


class QuotaCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Scope
    subject: str = Field(min_length=1, max_length=200, description="key id, user name or group name; `*`: each")
    metric: Metric
    period: Period
    limit: float = Field(description="at least 0; cost in the price table's currency")
    hard: bool = True


class QuotaView(BaseModel):
    id: str
    scope: Scope
    subject: str
    metric: Metric
    period: Period
    limit: float
    hard: bool
    source: str = Field(description="config or api")
    used: float | None = None
    reset_at: str | None = None


class QuotaList(BaseModel):
    quotas: list[QuotaView]
    timezone: str
    currency: str


class UsageRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    period: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost: float
    estimated: int = Field(description="records whose tokens were estimated")


class UsageReport(BaseModel):
    from_: str = Field(alias="from")
    to: str
    granularity: str
    group_by: list[str]
    currency: str
    timezone: str
    rows: list[dict[str, Any]]


class QuotaCreated(BaseModel):
    id: str


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str | None = Field(default=None, alias="from", max_length=40,
                              description="ISO 8601 date or date-time (local time zone when naive); "
                                          "default: the start of this month")
    to: str | None = Field(default=None, max_length=40, description="default: now")
    group_by: str = Field(default="", max_length=64,
                          description="comma-separated: key, user, group, model, upstream")
    granularity: Literal["hour", "day", "month"] = "day"
    format: Literal["json", "csv"] | None = Field(default=None, description="default: from Accept")
    scope: Literal["own", "all"] = Field(default="own", description="all: everyone's (needs usage:read)")
    group: str | None = Field(default=None, max_length=200, description="only this group's usage")


class QuotaQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["own", "all"] = Field(default="own",
                                         description="own: the quotas that apply to the caller, with use and "
                                                     "reset time; all: every rule (needs usage:read)")
