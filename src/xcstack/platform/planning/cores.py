"""Which cores the plan may use and in which order: the CPU budget, SMT and NUMA-aware core orders.

Pure arithmetic over core ids, so every placement rule can be tested on synthetic machines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xcstack.platform.cpulist import format_cpulist
from xcstack.platform.planning.findings import Findings
from xcstack.platform.probe import CpuResources, cpu_slots


@dataclass(frozen=True)
class CpuBudget:
    """The usable CPUs, the quota-aware budget and the `slots` cores planned for, in split order."""

    usable: list[int]
    budget: float  # cores of CPU time available (quota-aware)
    slots: int  # whole cores planned for
    cores: list[int]  # the planned cores: with SMT, distinct physical cores first, then sibling-adjacent


def cpu_budget(res: CpuResources, found: Findings) -> CpuBudget:
    """Phase 1: how many cores to plan for (quota rounded half up) and which ones."""
    usable = list(res.usable) or [0]
    budget = res.budget or float(len(usable))
    slots = cpu_slots(budget, len(usable))
    # With SMT, a reduced set takes distinct physical cores first, and the I/O / compute split runs
    # over a sibling-adjacent order, so the http workers share physical cores with each other rather
    # than with model workers.
    spread, smt_key = smt_orders(usable, res.smt_siblings)
    cores = sorted(spread[:slots], key=lambda c: smt_key[c]) if res.smt_siblings else usable[:slots]
    if res.quota_cores is not None:
        if slots < len(usable):
            found.notes.append(
                f"CPU quota {res.quota_cores:g} cores (cgroup cpu.max {res.cpu_max}): planning {slots} of the "
                f"{len(usable)} usable cores"
            )
        if abs(res.quota_cores - round(res.quota_cores)) > 1e-6:
            found.warnings.append(
                f"fractional CPU quota {res.quota_cores:g}: {slots} pinned processes share {res.quota_cores:g} "
                "cores of CPU time and will be throttled under full load"
            )
    if res.cpuset is not None and res.online and len(res.cpuset) < len(res.online):
        found.notes.append(
            f"cgroup cpuset {format_cpulist(res.cpuset)} of {len(res.online)} online CPUs "
            f"({format_cpulist(res.online)})"
        )
    if res.threads_per_core and res.threads_per_core > 1:
        found.notes.append(
            f"SMT: {res.threads_per_core} threads per core; logical CPUs are planned as cores "
            "(sibling threads share execution units)"
        )
    return CpuBudget(usable=usable, budget=budget, slots=slots, cores=cores)


def dedup(seq: Iterable[int]) -> list[int]:
    """`seq` without repeats, first occurrence kept (config lists may name a core twice)."""
    seen: set[int] = set()
    out: list[int] = []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def split_by_numa(cores: Sequence[int], io_count: int, numa: dict[str, list[int]]) -> tuple[list[int], list[int]]:
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


def smt_orders(usable: Sequence[int], siblings: list[list[int]]) -> tuple[list[int], dict[int, tuple[int, int]]]:
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


def spread_over_numa(cores: Sequence[int], k: int, numa: dict[str, list[int]]) -> list[int]:
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
