"""Settings of the gateway capability (the `[gateway]` table of the config file, XC_GATEWAY__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
