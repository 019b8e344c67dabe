"""Settings of the vector capability (the `[vector]` table of the config file, XC_VECTOR__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class VectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
