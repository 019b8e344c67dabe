"""Settings of the security capability (the `[security]` table of the config file, XC_SECURITY__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SecuritySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
