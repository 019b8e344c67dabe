"""The model repository: a directory with one folder per model (`model.onnx` + `config.json`).

    <repo>/<name>/model.onnx
    <repo>/<name>/config.json      ModelConfig below (inputs/outputs, batching, instances, device)
    <repo>/<name>/tokenizer.json   text models (kind = "embedding")

A model whose config is invalid is listed as unavailable with the reason (file, key, why); it never
stops the others from loading.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xcstack.inference.settings import BatchingDefaults
from xcstack.inference.tensors import DTYPES

log = logging.getLogger("xcstack.inference")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    datatype: str
    shape: list[int] = Field(min_length=1, max_length=16, description="-1 = variable; dim 0 is the batch")
    allow_non_finite: bool = False
    max_shape: list[int] | None = Field(None, description="upper bounds per dim (-1 = none), checked before batching")
    value_range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[min, max] allowed values (ids, masks), checked before batching"
    )

    @model_validator(mode="after")
    def _bounds(self) -> TensorSpec:
        if self.max_shape is not None and len(self.max_shape) != len(self.shape):
            raise ValueError("max_shape must have as many dims as shape")
        if self.value_range is not None and self.value_range[0] > self.value_range[1]:
            raise ValueError("value_range: min > max")
        return self

    @field_validator("datatype")
    @classmethod
    def _dt(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown datatype {v!r}; one of {sorted(DTYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dims are positive or -1 (variable)")
        return v


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_wait_ms: float | None = Field(None, ge=0, le=1000)
    token_budget: int | None = Field(None, ge=16, le=1_048_576)
    max_queue: int | None = Field(None, ge=1, le=1_000_000)


class InstanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(None, ge=1, le=256, description="model workers that load it (default: all)")
    execution_provider: Literal["cpu", "cuda", "cann"] = "cpu"
    device_ids: list[int] = Field(default_factory=lambda: [0], min_length=1, description="per instance, cycled")
    workers: list[int] | None = Field(None, description="pin to these model worker indexes (default: 0..count-1)")

    @field_validator("device_ids", "workers")
    @classmethod
    def _nonneg(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError("ids are >= 0")
        return v


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    platform: Literal["onnxruntime"] = "onnxruntime"
    kind: Literal["embedding", "rerank", "generic"] = "generic"
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    max_batch_size: int = Field(32, ge=1, le=4096)
    batching: BatchingConfig = BatchingConfig()  # type: ignore[call-arg]
    instance: InstanceConfig = InstanceConfig()  # type: ignore[call-arg]
    tokenizer: str | None = None
    text_input: str | None = Field(
        None, min_length=1, max_length=128, description="text models: a BYTES [n] input name accepted by /v2 infer"
    )
    max_seq_length: int = Field(256, ge=1, le=8192)
    dimensions: int | None = Field(None, ge=1, le=65536)
    query_prefix: str = Field("", max_length=256, description="text models: put before a query (`input_type` query)")
    passage_prefix: str = Field(
        "", max_length=256, description="text models: put before a document (`input_type` document or passage)")
    default_input_type: Literal["query", "document"] | None = Field(
        None, description="the prefix a /v1/embeddings request without `input_type` gets (None: raw text)")
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("letters, digits, '_', '.', '-' (max 128), starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for group in (self.inputs, self.outputs):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate tensor names in {names}")
        if self.kind in ("embedding", "rerank") and not self.tokenizer:
            raise ValueError(f"{'an' if self.kind == 'embedding' else 'a'} {self.kind} model needs `tokenizer`")
        if self.default_input_type is not None and not (self.query_prefix or self.passage_prefix):
            raise ValueError("default_input_type needs query_prefix or passage_prefix")
        if self.text_input and (not self.tokenizer or self.text_input in {t.name for t in self.inputs}):
            raise ValueError("text_input needs a tokenizer and a name that is not one of `inputs`")
        return self

    def prefix_for(self, input_type: str | None) -> str:
        """The text put before each input: `input_type` query | document | passage (an alias of document),
        None: the model's default_input_type (no prefix when it has none)."""
        kind = input_type or self.default_input_type
        if kind is None:
            return ""
        return self.query_prefix if kind == "query" else self.passage_prefix

    def batching_params(self, defaults: BatchingDefaults) -> BatchParams:
        b = self.batching
        return BatchParams(
            max_batch=self.max_batch_size,
            max_wait_s=(b.max_wait_ms if b.max_wait_ms is not None else defaults.max_wait_ms) / 1000.0,
            token_budget=b.token_budget if b.token_budget is not None else defaults.token_budget,
            max_queue=b.max_queue if b.max_queue is not None else defaults.max_queue,
        )

    def workers_for(self, total_workers: int) -> list[int]:
        """Model-worker indexes that load this model."""
        if self.instance.workers is not None:
            return sorted({w % total_workers for w in self.instance.workers})
        count = self.instance.count if self.instance.count is not None else total_workers
        return sorted({i % total_workers for i in range(count)})

    def device_id_for(self, worker_index: int, total_workers: int) -> int:
        """The device id of this model's instance on `worker_index` (device_ids cycled over instances)."""
        ids = self.instance.device_ids
        workers = self.workers_for(total_workers)
        pos = workers.index(worker_index) if worker_index in workers else worker_index
        return ids[pos % len(ids)]

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata (a text model also takes `text_input` alone: BYTES [-1])."""
        extra: dict[str, Any] = {"parameters": {"text_input": self.text_input}} if self.text_input else {}
        return {
            **extra,
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in self.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in self.outputs],
        }


@dataclass(frozen=True)
class BatchParams:
    max_batch: int
    max_wait_s: float
    token_budget: int
    max_queue: int


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    config: ModelConfig | None
    error: str | None = None

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"


class ModelRepository:
    """Scans a repository directory; `entries` holds valid and invalid models alike."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.entries: dict[str, ModelEntry] = {}

    def scan(self) -> ModelRepository:
        entries: dict[str, ModelEntry] = {}
        if self.root.is_dir():
            for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                entry = load_entry(d)
                entries[entry.name] = entry
                if entry.error:
                    log.warning("model repository: %s", entry.error)
        self.entries = entries
        return self

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name)

    def models(self) -> list[ModelConfig]:
        return [e.config for e in self.entries.values() if e.config is not None]

    def index(self) -> list[dict[str, Any]]:
        return [
            {"name": e.name, "version": "1", "state": "READY" if e.config else "UNAVAILABLE", "reason": e.error or ""}
            for e in self.entries.values()
        ]


def load_entry(d: Path) -> ModelEntry:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return ModelEntry(d.name, d, None, f"{cfg_path}: missing")
    if not (d / "model.onnx").is_file():
        return ModelEntry(d.name, d, None, f"{d / 'model.onnx'}: missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        return ModelEntry(d.name, d, None, f"{cfg_path}: not valid JSON: {exc}")
    if isinstance(raw, dict):
        raw.setdefault("name", d.name)
    try:
        cfg = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        reason = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        return ModelEntry(d.name, d, None, f"{cfg_path}: {key}: {reason}")
    if cfg.name != d.name:
        return ModelEntry(d.name, d, None, f"{cfg_path}: name {cfg.name!r} differs from its folder {d.name!r}")
    if cfg.tokenizer and not (d / cfg.tokenizer).is_file():
        return ModelEntry(d.name, d, None, f"{cfg_path}: tokenizer file {cfg.tokenizer!r} missing")
    return ModelEntry(d.name, d, cfg)
