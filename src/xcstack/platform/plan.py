"""The tuning plan: how many http and model workers, which core each is pinned to, which event loop.

Rules (ARCHITECTURE.md §1):
- The usable CPUs are online ∩ this process' affinity ∩ the cgroup cpuset. A CFS quota (cgroup
  cpu.max) caps how many of them are planned: the quota rounded half up (1.5 cores -> 2 slots,
  with a throttling warning).
- I/O (http workers) and compute (model workers, one per core) get disjoint cores when there are at
  least two slots: 1 slot -> everything shares it; 2 -> 1 http worker on the first core and 1 model
  worker on the second; n >= 3 -> ceil(n/4) I/O cores, the rest compute. With several NUMA nodes
  each node is split in the same proportion so both kinds stay local to every node.
- Overrides (config) win: explicit http worker count, the http worker cores (`worker_cpus`), the model
  worker count (0 = no local inference: every core serves http), pinning on/off, the event loop.
- What does not work here is left out: no model workers (and no inline models) when onnxruntime does
  not import (missing, an exception, a crash, a hang: tried in a child); no uvloop / orjson when they
  do not import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xcstack.platform.buildflags import BuildFlags, build_flags
from xcstack.platform.cpulist import format_cpulist
from xcstack.platform.probe import PlatformReport, cpu_slots

log = logging.getLogger("xcstack.platform")

# Rough resident memory of one model worker (ORT session + bundled MiniLM + batcher), for the cap.
MODEL_WORKER_MEM_BYTES = 512 * 1024 * 1024
WHEEL_ARCHES = frozenset({"x86_64", "aarch64"})  # archs with uvloop/orjson/onnxruntime wheels on PyPI
RECOMMENDED_NOFILE = 65536
RECOMMENDED_SOMAXCONN = 4096


@dataclass
class PlanOverrides:
    http_workers: int | None = None
    worker_cpus: list[int] | None = None  # cores the http workers may use
    model_workers: int | None = None  # 0: no model workers
    model_cpus: list[int] | None = None  # cores the model workers may use (one worker per core)
    model_worker_cpus: list[list[int]] | None = None  # explicit cores of each model worker
    pin: bool | None = None
    event_loop: str | None = None  # "auto" | "uvloop" | "asyncio"
    backlog: int | None = None  # listen backlog, checked against somaxconn

    @classmethod
    def from_settings(cls, settings: Any) -> PlanOverrides:
        """From xcstack Settings: [server] workers / worker_cpus / pin_cpus / loop / backlog, and
        [inference] workers / worker_cpus (per-worker core lists); inference disabled or `mode = "inline"`
        means no model worker processes (every planned core serves http)."""
        server = getattr(settings, "server", None)
        inference = getattr(settings, "inference", None)

        def ints(v: Any) -> list[int] | None:
            return [int(x) for x in v] if v is not None else None

        model_workers = getattr(inference, "workers", None)
        if inference is not None and (
            getattr(inference, "enabled", True) is False or getattr(inference, "mode", "process") == "inline"
        ):
            model_workers = 0
        raw = getattr(inference, "worker_cpus", None)
        per_worker: list[list[int]] | None = None
        if raw is not None:
            per_worker = [[int(c) for c in g] if isinstance(g, list | tuple) else [int(g)] for g in raw]
        return cls(
            http_workers=getattr(server, "workers", None),
            worker_cpus=ints(getattr(server, "worker_cpus", None)),
            pin=False if getattr(server, "pin_cpus", True) is False else None,
            event_loop=getattr(server, "loop", None),
            backlog=getattr(server, "backlog", None),
            model_workers=model_workers,
            model_worker_cpus=per_worker if model_workers != 0 else None,
        )


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


def _dedup(seq: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _split(cores: Sequence[int], io_count: int, numa: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """Pick `io_count` I/O cores out of `cores`, proportionally per NUMA node; the rest compute."""
    groups: list[list[int]] = []
    placed: set[int] = set()
    for _, node_cpus in sorted(numa.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        g = [c for c in cores if c in set(node_cpus) and c not in placed]
        if g:
            groups.append(g)
            placed.update(g)
    rest = [c for c in cores if c not in placed]
    if rest:
        groups.append(rest)
    if len(groups) <= 1:
        return list(cores[:io_count]), list(cores[io_count:])
    total = len(cores)
    exact = [io_count * len(g) / total for g in groups]
    take = [min(len(g) - 1 if len(g) > 1 else len(g), math.floor(e)) for g, e in zip(groups, exact, strict=True)]
    order = sorted(range(len(groups)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    i = 0
    while sum(take) < io_count and i < 4 * len(groups):
        gi = order[i % len(groups)]
        if take[gi] < len(groups[gi]) - (1 if len(groups[gi]) > 1 else 0):
            take[gi] += 1
        i += 1
    io: list[int] = []
    compute: list[int] = []
    for g, t in zip(groups, take, strict=True):
        io += g[:t]
        compute += g[t:]
    if not io:  # degenerate: fall back to the simple split
        return list(cores[:io_count]), list(cores[io_count:])
    return io, compute


def _smt_orders(usable: Sequence[int], siblings: list[list[int]]) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """(spread order: first thread of every physical core, then second threads, ...;
    key cpu -> (physical core index, thread index) for a sibling-adjacent order)."""
    group_of = {c: g for g in siblings for c in g}
    key: dict[int, tuple[int, int]] = {}
    gi = 0
    for c in usable:  # physical cores numbered in the order their first thread appears
        if c in key:
            continue
        for t, x in enumerate(group_of.get(c, [c])):
            key.setdefault(x, (gi, t))
        gi += 1
    spread = sorted(usable, key=lambda c: (key[c][1], key[c][0]))
    return spread, key


def _spread(cores: Sequence[int], k: int, numa: dict[str, list[int]]) -> list[int]:
    """`k` of `cores`, taken round-robin over NUMA nodes so a reduced set stays balanced."""
    node_of = {c: n for n, cl in numa.items() for c in cl}
    groups: dict[str, list[int]] = {}
    for c in cores:
        groups.setdefault(node_of.get(c, "?"), []).append(c)
    lists = list(groups.values())
    out: list[int] = []
    i = 0
    while len(out) < k and any(lists):
        g = lists[i % len(lists)]
        if g:
            out.append(g.pop(0))
        i += 1
    return sorted(out)


def derive_plan(
    report: PlatformReport,
    overrides: PlanOverrides | Any = None,
    *,
    model_worker_mem_bytes: int = MODEL_WORKER_MEM_BYTES,
) -> TuningPlan:
    """The plan for `report`; `overrides` is a PlanOverrides or xcstack Settings (converted with
    PlanOverrides.from_settings)."""
    if overrides is None:
        ov = PlanOverrides()
    elif isinstance(overrides, PlanOverrides):
        ov = overrides
    else:
        ov = PlanOverrides.from_settings(overrides)
    notes: list[str] = []
    warnings: list[str] = []
    overridden: list[str] = []
    res = report.cpus
    usable = list(res.usable) or [0]
    budget = res.budget or float(len(usable))
    slots = cpu_slots(budget, len(usable))
    # With SMT, a reduced set takes distinct physical cores first, and the I/O / compute split runs
    # over a sibling-adjacent order, so the http workers share physical cores with each other rather
    # than with model workers.
    spread, smt_key = _smt_orders(usable, res.smt_siblings)
    cores = sorted(spread[:slots], key=lambda c: smt_key[c]) if res.smt_siblings else usable[:slots]
    if res.quota_cores is not None:
        if slots < len(usable):
            notes.append(
                f"CPU quota {res.quota_cores:g} cores (cgroup cpu.max {res.cpu_max}): planning {slots} of the "
                f"{len(usable)} usable cores"
            )
        if abs(res.quota_cores - round(res.quota_cores)) > 1e-6:
            warnings.append(
                f"fractional CPU quota {res.quota_cores:g}: {slots} pinned processes share {res.quota_cores:g} "
                "cores of CPU time and will be throttled under full load"
            )
    if res.cpuset is not None and res.online and len(res.cpuset) < len(res.online):
        notes.append(
            f"cgroup cpuset {format_cpulist(res.cpuset)} of {len(res.online)} online CPUs "
            f"({format_cpulist(res.online)})"
        )
    if res.threads_per_core and res.threads_per_core > 1:
        notes.append(
            f"SMT: {res.threads_per_core} threads per core; logical CPUs are planned as cores "
            "(sibling threads share execution units)"
        )

    # --- which cores do I/O and which compute
    model_req = ov.model_workers
    if model_req is not None:
        overridden.append("model_workers")
    ort_problem = _import_problem(report, "onnxruntime")
    inference_unavailable = ""
    if ort_problem and model_req is None and ov.model_worker_cpus is None and ov.model_cpus is None:
        model_req = 0  # a model worker could not load its runtime: plan none, every core serves http
        inference_unavailable = f"onnxruntime is not importable ({ort_problem})"
        warnings.append(f"onnxruntime is not importable ({ort_problem}): no model workers planned, local "
                        "inference is off")  # fmt: skip
    elif ort_problem and model_req != 0:
        warnings.append(f"onnxruntime is not importable ({ort_problem}): the configured model workers will not start")
    io: list[int]
    compute: list[int]
    if ov.worker_cpus is not None:
        overridden.append("worker_cpus")
        wanted = _dedup(ov.worker_cpus)
        bad = [c for c in wanted if c not in usable]
        io = [c for c in wanted if c in usable]
        if bad:
            warnings.append(
                f"worker_cpus {format_cpulist(bad)} are not usable by this process (usable: "
                f"{format_cpulist(usable)}); ignored"
            )
        if not io:
            warnings.append("no usable core left in worker_cpus: using the automatic plan")
    else:
        io = []
    # explicit compute cores: per-worker lists, or a pool with one worker per core
    model_groups: list[list[int]] | None = None
    pool: list[int] | None = None
    if ov.model_worker_cpus is not None and model_req != 0:
        overridden.append("model_worker_cpus")
        groups = []
        for g in ov.model_worker_cpus:
            ok = [c for c in _dedup(g) if c in usable]
            if len(ok) < len(set(g)):
                warnings.append(
                    f"model worker cpus {format_cpulist(set(g) - set(ok))} are not usable by this process; ignored"
                )
            if ok:
                groups.append(ok)
        if groups:
            model_groups = groups
            pool = _dedup(c for g in groups for c in g)
        else:
            warnings.append("no usable core in the model worker cpus: using the automatic plan")
    elif ov.model_cpus is not None and model_req != 0:
        overridden.append("model_cpus")
        mc = [c for c in _dedup(ov.model_cpus) if c in usable]
        if len(mc) < len(_dedup(ov.model_cpus)):
            warnings.append("some model worker cpus are not usable by this process; ignored")
        pool = mc or None
    if io:
        compute = pool or [c for c in cores if c not in io] or [c for c in usable if c not in io] or list(io)
    elif pool:
        compute = pool
        io = [c for c in cores if c not in pool] or [c for c in usable if c not in pool] or list(pool[:1])
    elif model_req == 0:
        io, compute = list(cores), []
    elif len(cores) == 1:
        io, compute = list(cores), list(cores)
    else:
        n = len(cores)
        if ov.http_workers is not None and model_req is None:
            io_count = max(1, min(n - 1, ov.http_workers))
        elif model_req is not None:
            io_count = max(1, n - min(model_req, n - 1))
        else:
            io_count = 1 if n == 2 else max(1, math.ceil(n / 4))
        io, compute = _split(cores, io_count, res.numa_nodes)

    # --- counts
    if ov.http_workers is not None:
        overridden.append("http_workers")
        http_n = ov.http_workers
    else:
        http_n = len(io)
    http_n = max(1, http_n)
    if http_n > len(io):
        warnings.append(f"{http_n} http workers on {len(io)} I/O cores: workers share cores")

    if model_req is not None:
        model_n = max(0, model_req)
    elif model_groups is not None:
        model_n = len(model_groups)
    else:
        model_n = len(compute)
        mem = report.memory.effective_bytes
        if mem and model_n > 1:
            cap = max(1, int(mem * 0.6 // model_worker_mem_bytes))
            if model_n > cap:
                notes.append(
                    f"model workers capped at {cap} by memory ({mem / 2**30:.1f} GiB, "
                    f"~{model_worker_mem_bytes / 2**20:.0f} MiB each)"
                )
                model_n = cap
                compute = _spread(compute, cap, res.numa_nodes)
    if model_n and not compute:
        compute = list(io)
    if model_n > len(compute) > 0:
        warnings.append(f"{model_n} model workers on {len(compute)} compute cores: workers share cores")
    used_compute = set(c for g in model_groups for c in g) if model_groups else set(compute[: max(model_n, 0)])
    shared = bool(set(io) & used_compute) if model_n else False
    if shared and len(cores) == 1:
        notes.append("one usable core: http and model workers share it")
    elif shared:
        warnings.append("http and model workers share cores (not enough cores for disjoint I/O and compute)")

    # --- pinning
    pin = True if ov.pin is None else bool(ov.pin)
    if ov.pin is not None:
        overridden.append("pin")
    if pin:
        http_cpus = [[io[i % len(io)]] for i in range(http_n)]
        if model_groups:
            model_cpus = [list(model_groups[i % len(model_groups)]) for i in range(model_n)]
        elif compute:
            model_cpus = [[compute[i % len(compute)]] for i in range(model_n)]
        else:
            model_cpus = [[] for _ in range(model_n)]
    else:
        notes.append("CPU pinning disabled by config (server.pin_cpus = false)")
        http_cpus = [[] for _ in range(http_n)]
        model_cpus = [[] for _ in range(model_n)]

    # --- event loop and JSON
    py = report.python
    arch = report.arch
    uvloop_ok = py.has("uvloop") if py.probed else arch in WHEEL_ARCHES
    orjson_ok = py.has("orjson") if py.probed else arch in WHEEL_ARCHES
    if not py.probed:
        notes.append(
            f"Python accelerators not probed (root={report.root}); assuming PyPI wheels exist for {arch}"
            if arch in WHEEL_ARCHES
            else f"Python accelerators not probed (root={report.root})"
        )
    want_loop = ov.event_loop or "auto"
    if ov.event_loop and ov.event_loop != "auto":
        overridden.append("event_loop")
    for module, instead in (("uvloop", "the asyncio event loop"), ("orjson", "the stdlib json")):
        pkg = py.package(module) if py.probed else None
        if pkg is not None and pkg.present and not pkg.works:
            warnings.append(f"{module} is installed but does not import ({pkg.detail}): using {instead}")
    if want_loop == "asyncio":
        loop = "asyncio"
    elif uvloop_ok:
        loop = "uvloop"
    else:
        loop = "asyncio"
        if want_loop == "uvloop":
            warnings.append("server.loop = uvloop but uvloop is not importable: falling back to asyncio")
    json_lib = "orjson" if orjson_ok else "json"
    if arch.startswith("loongarch"):
        warnings.append(
            "LoongArch: PyPI has no loongarch64 wheels for uvloop, orjson, onnxruntime, cryptography or granian; "
            f"event loop {loop}, JSON {json_lib}; use uvicorn, and install onnxruntime/cryptography from the "
            "distribution or a source build"
        )
    if report.emulation:
        warnings.append(report.emulation)

    providers = [p for p in py.onnxruntime_providers] or ["CPUExecutionProvider"]
    ort = {
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "session.intra_op.allow_spinning": "0",
        "providers": [p for p in providers if p != "AzureExecutionProvider"],
    }

    # --- kernel / limits advice
    lim = report.limits
    if lim.somaxconn is not None and lim.somaxconn < RECOMMENDED_SOMAXCONN:
        warnings.append(
            f"net.core.somaxconn={lim.somaxconn} < {RECOMMENDED_SOMAXCONN}: bursts of connections are dropped "
            "(xcstack doctor --sysctl)"
        )
    if ov.backlog is not None and lim.somaxconn is not None and ov.backlog > lim.somaxconn:
        warnings.append(f"server.backlog={ov.backlog} is silently capped by net.core.somaxconn={lim.somaxconn}")
    if lim.nofile_soft is not None and 0 <= lim.nofile_soft < RECOMMENDED_NOFILE:
        warnings.append(
            f"open files limit (ulimit -n) {lim.nofile_soft} < {RECOMMENDED_NOFILE}: raise LimitNOFILE in the "
            "systemd unit or ulimit -n"
        )
    io_u = report.io_uring
    if io_u.status not in ("available", "not_probed"):
        notes.append(f"io_uring {io_u.status}: {io_u.reason} (servers use epoll)")

    return TuningPlan(
        usable_cpus=usable,
        cpu_budget=budget,
        cpu_slots=slots,
        pin=pin,
        http_workers=http_n,
        http_cpus=http_cpus,
        model_workers=model_n,
        model_cpus=model_cpus,
        io_cores=sorted(set(io)),
        compute_cores=sorted(used_compute) if model_n else [],
        shared_cores=shared,
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
        overridden=overridden,
        notes=notes,
        warnings=warnings,
        inference_unavailable=inference_unavailable,
    )


def _import_problem(report: PlatformReport, module: str) -> str:
    """Why `module` cannot be used on the probed machine ("" when it can, or when imports were not probed)."""
    py = report.python
    if not py.probed or py.has(module):
        return ""
    pkg = py.package(module)
    if pkg is None or not pkg.present:
        return "not installed"
    return pkg.detail or pkg.status


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
