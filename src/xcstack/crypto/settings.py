"""Settings of the crypto capability (the `[crypto]` table of the config file, XC_CRYPTO__* env vars)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CryptoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
