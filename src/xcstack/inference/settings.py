"""Settings of the inference capability (the `[inference]` table of the config file, XC_INFERENCE__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class InferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
