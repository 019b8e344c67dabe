"""Settings of the db capability (the `[db]` table of the config file, XC_DB__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DbSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
