"""The answer of `GET /v1/system/processes` (also the shape the supervisor's table is read into)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ProcessEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["http", "side"] = Field(description="an http worker, or a side process a capability declares")
    kind: str = Field(description="`http`, `model-worker`, `llm-worker`, `hsm-owner`, `milvus-lite`, ...")
    name: str = Field(description="kind and index, e.g. `model-worker[0]`")
    index: int = Field(ge=0)
    pid: int | None = Field(description="null while it waits to be restarted")
    cpus: list[int] = Field(description="the cores it is pinned to by the tuning plan or config ([] = not pinned)")
    threads: int | None = Field(None, description="compute threads as planned (null: no figure, e.g. an event loop)")
    started_at: float | None = Field(description="UNIX seconds of its last start")
    restarts: int = Field(0, ge=0, description="times it died and was started again")
    ready: bool | None = Field(description="http workers: reported ready; side processes: their readiness check "
                                           "(null: none declared)")
    last_exit: int | None = Field(None, description="the exit status of its last death (negative: the signal)")
    state: Literal["starting", "running", "restarting", "stopped"]
    this_worker: bool = Field(False, description="the http worker that answered")


class PlanSummary(BaseModel):
    model_config = ConfigDict(extra="ignore")

    usable_cpus: list[int] = []
    cpu_budget: float = 0.0
    cpu_slots: int = 0
    pin: bool = False
    http_workers: int = 0
    model_workers: int = 0
    io_cores: list[int] = []
    compute_cores: list[int] = []
    shared_cores: bool = False
    event_loop: str = ""
    llm_cpus: list[int] = []
    llm_threads: int = 0
    warnings: list[str] = []


class Supervisor(BaseModel):
    pid: int
    started_at: float


class Worker(BaseModel):
    pid: int
    cpus: list[int] = Field(description="the cores this worker may run on (its affinity)")


class ProcessTable(BaseModel):
    source: Literal["supervisor", "this_process"] = Field(
        description="`supervisor`: the table `xcstack serve` publishes; `this_process`: no supervisor's table "
                    "(the app was started another way, or the table could not be read: see `note`)")
    note: str = ""
    now: float = Field(description="this worker's clock (UNIX seconds), for uptimes")
    cpu_count: int = Field(description="CPUs of this machine")
    worker: Worker
    supervisor: Supervisor | None = None
    updated_at: float | None = Field(None, description="when the supervisor last wrote the table")
    plan: PlanSummary | None = Field(None, description="the tuning plan's figures (`xcstack doctor` prints all)")
    processes: list[ProcessEntry]
