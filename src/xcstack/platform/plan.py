"""The tuning plan: how many http and model workers, which core each is pinned to, which event loop.

Rules (docs/architecture.md §1):
- The usable CPUs are online ∩ this process' affinity ∩ the cgroup cpuset. A CFS quota (cgroup
  cpu.max) caps how many of them are planned: the quota rounded half up (1.5 cores -> 2 slots,
  with a throttling warning).
- I/O (http workers) and compute (model workers, one per core) get disjoint cores when there are at
  least two slots: 1 slot -> everything shares it; 2 -> 1 http worker on the first core and 1 model
  worker on the second; n >= 3 -> ceil(n/4) I/O cores, the rest compute. With several NUMA nodes
  each node is split in the same proportion so both kinds stay local to every node.
- A local chat model's llama.cpp worker, when one will run, gets compute cores of its own
  (`planning/llm.py`): half of them with model workers, all of them without; threads = its cores.
- Overrides (config) win: explicit http worker count, the http worker cores (`worker_cpus`), the model
  worker count (0 = no local inference: every core serves http), pinning on/off, the event loop.
- What does not work here is left out: no model workers (and no inline models) when onnxruntime does
  not import (missing, an exception, a crash, a hang: tried in a child); no uvloop / orjson when they
  do not import.

The phases live in `xcstack.platform.planning`, one module per concern; this module holds the plan
itself and composes them (`derive_plan`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from xcstack.platform.buildflags import BuildFlags, build_flags
from xcstack.platform.cpulist import format_cpulist
from xcstack.platform.planning.advice import kernel_advice
from xcstack.platform.planning.cores import cpu_budget
from xcstack.platform.planning.findings import Findings
from xcstack.platform.planning.llm import llm_cores, split_request
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.planning.runtime import loop_and_json, onnxruntime_options
from xcstack.platform.planning.workers import (
    assign_cores,
    explicit_compute_cores,
    explicit_io_cores,
    model_request,
    pin_workers,
    worker_counts,
)
from xcstack.platform.probe import PlatformReport

log = logging.getLogger("xcstack.platform")

# Rough resident memory of one model worker (ORT session + bundled MiniLM + batcher), for the cap.
MODEL_WORKER_MEM_BYTES = 512 * 1024 * 1024


@dataclass
class TuningPlan:
    usable_cpus: list[int]
    cpu_budget: float  # cores of CPU time available (quota-aware)
    cpu_slots: int  # whole cores planned for
    pin: bool
    http_workers: int
    http_cpus: list[list[int]]  # per http worker; [] = not pinned
    model_workers: int
    model_cpus: list[list[int]]  # per model worker; [] = not pinned
    io_cores: list[int]
    compute_cores: list[int]
    shared_cores: bool  # I/O and compute overlap
    event_loop: str  # uvloop | asyncio
    json_library: str  # orjson | json
    onnxruntime: dict[str, Any]  # recommended session options
    build: BuildFlags
    model_worker_env: dict[str, str] = field(default_factory=dict)  # env for model worker processes
    # why local inference cannot run on this machine ("" when it can): no model workers are planned, and
    # http workers must not load models inline either (the same import would take them down)
    inference_unavailable: str = ""
    # the local chat model's llama.cpp worker (platform/planning/llm.py): its cores ([] = none runs, or
    # pinning is off) and its decode threads (0 = none runs)
    llm_cpus: list[int] = field(default_factory=list)
    llm_threads: int = 0
    overridden: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["build"]["env"] = self.build.env
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningPlan:
        """Inverse of to_dict (e.g. a plan handed to a child process as JSON)."""
        d = dict(data)
        b = dict(d.pop("build"))
        b.pop("env", None)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(build=BuildFlags(**b), **{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> TuningPlan:
        return cls.from_dict(json.loads(text))

    def pin_current_process(self, role: str, index: int) -> bool:
        """Pin this process as http worker / model worker `index` (role "http" | "model"); False when
        pinning is off, the plan has no core for it, or the kernel refuses (logged)."""
        if not self.pin:
            return False
        if role == "http":
            cpus = self.http_worker_cpus(index)
        elif role == "model":
            cpus = self.model_worker_cpus(index)
        else:
            raise ValueError(f"role must be 'http' or 'model', not {role!r}")
        return apply_affinity(cpus) if cpus else False

    def http_worker_cpus(self, index: int) -> list[int]:
        return list(self.http_cpus[index]) if index < len(self.http_cpus) else []

    def model_worker_cpus(self, index: int) -> list[int]:
        return list(self.model_cpus[index]) if index < len(self.model_cpus) else []


def derive_plan(
    report: PlatformReport,
    overrides: PlanOverrides | Any = None,
    *,
    model_worker_mem_bytes: int = MODEL_WORKER_MEM_BYTES,
) -> TuningPlan:
    """The plan for `report`; `overrides` is a PlanOverrides or xcstack Settings (converted with
    PlanOverrides.from_settings). Runs the phases of `xcstack.platform.planning` in order; each appends its
    notes and warnings to one `Findings`, so their order is the order of the phases."""
    if overrides is None:
        ov = PlanOverrides()
    elif isinstance(overrides, PlanOverrides):
        ov = overrides
    else:
        ov = PlanOverrides.from_settings(overrides)
    found = Findings()
    res = report.cpus
    cpu = cpu_budget(res, found)
    model_req, inference_unavailable = model_request(report, ov, found)
    io = explicit_io_cores(ov, cpu.usable, found)
    model_groups, pool = explicit_compute_cores(ov, model_req, cpu.usable, found)
    io, compute = assign_cores(cpu.cores, cpu.usable, io, pool, split_request(ov, model_req), ov.http_workers,
                               res.numa_nodes)
    llm = llm_cores(ov, model_req, pool is not None, io, compute, cpu.usable, res.numa_nodes, found)
    compute = llm.compute
    counts = worker_counts(report, ov, model_req, model_groups, io, compute, single_core=len(cpu.cores) == 1,
                           model_worker_mem_bytes=model_worker_mem_bytes, found=found)
    pin, http_cpus, model_cpus = pin_workers(ov, io, counts, model_groups, found)
    loop, json_lib = loop_and_json(report, ov, found)
    ort = onnxruntime_options(report.python)
    kernel_advice(report, ov, found)
    return TuningPlan(
        usable_cpus=cpu.usable,
        cpu_budget=cpu.budget,
        cpu_slots=cpu.slots,
        pin=pin,
        http_workers=counts.http,
        http_cpus=http_cpus,
        model_workers=counts.model,
        model_cpus=model_cpus,
        io_cores=sorted(set(io)),
        compute_cores=sorted(counts.used_compute) if counts.model else [],
        shared_cores=counts.shared,
        event_loop=loop,
        json_library=json_lib,
        onnxruntime=ort,
        build=build_flags(report.cpu),
        model_worker_env={
            # one compute thread per pinned model worker: keep BLAS/OpenMP pools from oversubscribing
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        },
        overridden=found.overridden,
        notes=found.notes,
        warnings=found.warnings,
        inference_unavailable=inference_unavailable,
        llm_cpus=list(llm.cores) if pin else [],
        llm_threads=len(llm.cores),
    )


def apply_affinity(cpus: Sequence[int], pid: int = 0) -> bool:
    """Pin `pid` (0: this process) to `cpus` with os.sched_setaffinity.

    A no-op that logs a warning (and returns False) when cpus is empty, the platform has no
    sched_setaffinity, or the kernel refuses (EPERM/EINVAL: a cpuset or policy forbids it)."""
    wanted = sorted(set(cpus))
    if not wanted:
        return False
    setter = getattr(os, "sched_setaffinity", None)
    if setter is None:
        log.warning("cpu pinning to %s skipped: os.sched_setaffinity is not available", format_cpulist(wanted))
        return False
    try:
        setter(pid, wanted)
    except (OSError, ValueError) as exc:
        log.warning("cpu pinning to %s not permitted: %s; running unpinned", format_cpulist(wanted), exc)
        return False
    return True


def plan_for_settings(
    settings: Any, root: Any = "/", *, onnxruntime_providers: bool = True
) -> tuple[PlatformReport, TuningPlan]:
    """Probe this machine and derive the plan with the config's overrides (for the supervisor)."""
    from xcstack.platform.probe import probe

    report = probe(root, onnxruntime_providers=onnxruntime_providers)
    return report, derive_plan(report, PlanOverrides.from_settings(settings))
