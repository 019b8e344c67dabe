"""Settings of the supply capability (the `[supply]` table of the config file, XC_SUPPLY__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SupplySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
