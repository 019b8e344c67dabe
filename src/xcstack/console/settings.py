"""The `[console]` section: the web console at /console (docs/console.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from xcstack.timezones import TimeZoneName


class ConsoleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="serve the web console at /console (needs [security] on)")
    default_language: Literal["zh-CN", "en"] = Field(
        default="zh-CN", description="language when neither the switch nor Accept-Language chooses one")
    timezone: TimeZoneName = Field(default="Asia/Shanghai", description="time zone the console shows dates in")
    poll_s: float = Field(default=2.0, ge=0.5, le=60.0, description="how often the overview polls its metrics")
    export_max_records: int = Field(default=100_000, ge=1, le=10_000_000,
                                    description="most audit records one console export writes")
