"""Worker placement: which cores do I/O and which compute, how many http and model workers, and pinning.

I/O (http workers) and compute (model workers, one per core) get disjoint cores when there are at least
two slots, so a model run never delays the event loop of an http worker; config overrides win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from xcstack.platform.cpulist import format_cpulist
from xcstack.platform.planning.cores import dedup, split_by_numa, spread_over_numa
from xcstack.platform.planning.findings import Findings
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.planning.runtime import import_problem
from xcstack.platform.probe import PlatformReport


def model_request(report: PlatformReport, ov: PlanOverrides, found: Findings) -> tuple[int | None, str]:
    """Phase: (requested model workers or None for automatic, why local inference is off or "").

    A model worker that cannot import onnxruntime would crash-loop: unless the config asks for model
    workers explicitly, none are planned and every core serves http."""
    model_req = ov.model_workers
    if model_req is not None:
        found.overridden.append("model_workers")
    ort_problem = import_problem(report, "onnxruntime")
    unavailable = ""
    if ort_problem and model_req is None and ov.model_worker_cpus is None and ov.model_cpus is None:
        model_req = 0
        unavailable = f"onnxruntime is not importable ({ort_problem})"
        found.warnings.append(f"onnxruntime is not importable ({ort_problem}): no model workers planned, local "
                              "inference is off")  # fmt: skip
    elif ort_problem and model_req != 0:
        found.warnings.append(
            f"onnxruntime is not importable ({ort_problem}): the configured model workers will not start"
        )
    return model_req, unavailable


def explicit_io_cores(ov: PlanOverrides, usable: Sequence[int], found: Findings) -> list[int]:
    """Phase: the configured http worker cores this process may use ([] = automatic)."""
    if ov.worker_cpus is None:
        return []
    found.overridden.append("worker_cpus")
    wanted = dedup(ov.worker_cpus)
    bad = [c for c in wanted if c not in usable]
    io = [c for c in wanted if c in usable]
    if bad:
        found.warnings.append(
            f"worker_cpus {format_cpulist(bad)} are not usable by this process (usable: "
            f"{format_cpulist(usable)}); ignored"
        )
    if not io:
        found.warnings.append("no usable core left in worker_cpus: using the automatic plan")
    return io


def explicit_compute_cores(
    ov: PlanOverrides, model_req: int | None, usable: Sequence[int], found: Findings
) -> tuple[list[list[int]] | None, list[int] | None]:
    """Phase: (per-model-worker core lists, pool of model cores with one worker per core), both usable-only;
    (None, None) when the config names none (or none usable) or no model workers run."""
    if ov.model_worker_cpus is not None and model_req != 0:
        found.overridden.append("model_worker_cpus")
        groups: list[list[int]] = []
        for g in ov.model_worker_cpus:
            ok = [c for c in dedup(g) if c in usable]
            if len(ok) < len(set(g)):
                found.warnings.append(
                    f"model worker cpus {format_cpulist(set(g) - set(ok))} are not usable by this process; ignored"
                )
            if ok:
                groups.append(ok)
        if groups:
            return groups, dedup(c for g in groups for c in g)
        found.warnings.append("no usable core in the model worker cpus: using the automatic plan")
        return None, None
    if ov.model_cpus is not None and model_req != 0:
        found.overridden.append("model_cpus")
        mc = [c for c in dedup(ov.model_cpus) if c in usable]
        if len(mc) < len(dedup(ov.model_cpus)):
            found.warnings.append("some model worker cpus are not usable by this process; ignored")
        return None, mc or None
    return None, None


def assign_cores(
    cores: Sequence[int],
    usable: Sequence[int],
    io: list[int],
    pool: list[int] | None,
    model_req: int | None,
    http_workers: int | None,
    numa: dict[str, list[int]],
) -> tuple[list[int], list[int]]:
    """Phase: (I/O cores, compute cores). Explicit cores first, the other kind gets the rest; otherwise
    1 slot is shared, 2 slots split 1 + 1, n >= 3 give ceil(n/4) I/O cores, proportionally per NUMA node."""
    if io:
        return io, pool or [c for c in cores if c not in io] or [c for c in usable if c not in io] or list(io)
    if pool:
        io = [c for c in cores if c not in pool] or [c for c in usable if c not in pool] or list(pool[:1])
        return io, pool
    if model_req == 0:
        return list(cores), []
    if len(cores) == 1:
        return list(cores), list(cores)
    n = len(cores)
    if http_workers is not None and model_req is None:
        io_count = max(1, min(n - 1, http_workers))
    elif model_req is not None:
        io_count = max(1, n - min(model_req, n - 1))
    else:
        io_count = 1 if n == 2 else max(1, math.ceil(n / 4))
    return split_by_numa(cores, io_count, numa)


@dataclass(frozen=True)
class WorkerCounts:
    """How many workers of each kind, and the compute cores they end up on."""

    http: int
    model: int
    compute: list[int]  # compute cores after the memory cap (the I/O cores when none are left)
    used_compute: set[int]  # the compute cores model workers are placed on
    shared: bool  # I/O and compute overlap


def worker_counts(
    report: PlatformReport,
    ov: PlanOverrides,
    model_req: int | None,
    model_groups: list[list[int]] | None,
    io: list[int],
    compute: list[int],
    *,
    single_core: bool,
    model_worker_mem_bytes: int,
    found: Findings,
) -> WorkerCounts:
    """Phase: one http worker per I/O core and one model worker per compute core unless configured; model
    workers capped by memory (60% of it), spread over NUMA nodes when capped."""
    if ov.http_workers is not None:
        found.overridden.append("http_workers")
        http_n = ov.http_workers
    else:
        http_n = len(io)
    http_n = max(1, http_n)
    if http_n > len(io):
        found.warnings.append(f"{http_n} http workers on {len(io)} I/O cores: workers share cores")

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
                found.notes.append(
                    f"model workers capped at {cap} by memory ({mem / 2**30:.1f} GiB, "
                    f"~{model_worker_mem_bytes / 2**20:.0f} MiB each)"
                )
                model_n = cap
                compute = spread_over_numa(compute, cap, report.cpus.numa_nodes)
    if model_n and not compute:
        compute = list(io)
    if model_n > len(compute) > 0:
        found.warnings.append(f"{model_n} model workers on {len(compute)} compute cores: workers share cores")
    used_compute = set(c for g in model_groups for c in g) if model_groups else set(compute[: max(model_n, 0)])
    shared = bool(set(io) & used_compute) if model_n else False
    if shared and single_core:
        found.notes.append("one usable core: http and model workers share it")
    elif shared:
        found.warnings.append("http and model workers share cores (not enough cores for disjoint I/O and compute)")
    return WorkerCounts(http=http_n, model=model_n, compute=compute, used_compute=used_compute, shared=shared)


def pin_workers(
    ov: PlanOverrides,
    io: list[int],
    counts: WorkerCounts,
    model_groups: list[list[int]] | None,
    found: Findings,
) -> tuple[bool, list[list[int]], list[list[int]]]:
    """Phase: (pinning on, cores of each http worker, cores of each model worker); round-robin over the
    I/O and compute cores, [] per worker when pinning is off."""
    pin = True if ov.pin is None else bool(ov.pin)
    if ov.pin is not None:
        found.overridden.append("pin")
    http_n, model_n, compute = counts.http, counts.model, counts.compute
    if not pin:
        found.notes.append("CPU pinning disabled by config (server.pin_cpus = false)")
        return pin, [[] for _ in range(http_n)], [[] for _ in range(model_n)]
    http_cpus = [[io[i % len(io)]] for i in range(http_n)]
    if model_groups:
        model_cpus = [list(model_groups[i % len(model_groups)]) for i in range(model_n)]
    elif compute:
        model_cpus = [[compute[i % len(compute)]] for i in range(model_n)]
    else:
        model_cpus = [[] for _ in range(model_n)]
    return pin, http_cpus, model_cpus
