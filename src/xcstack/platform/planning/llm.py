"""The local chat model's cores: which compute cores the llama.cpp worker gets, and how many decode threads.

llama.cpp decodes with one thread per core it is given, and every thread of it spins over the same
weights and KV cache; an ONNX model worker is one single-threaded process per core. Sharing a core between
them makes both slow (and a decode thread preempted by a model run stalls the whole step), so the plan
gives the llm worker compute cores of its own:

- inference off (no model workers): the llm worker gets every compute core of the usual I/O | compute
  split (2 cores: 1 http + 1 llm; n >= 3: ceil(n/4) http, the rest llm) instead of all of them serving http;
- inference on: the compute cores are halved, the llm worker taking ceil(k/2) of the k, always leaving one
  for the model workers; with one compute core (2 usable cores) nothing can be split: the llm worker and
  the model worker share it (a note says so; http keeps its own core);
- several NUMA nodes, inference on: the llm worker stays on one node (the last one holding compute cores):
  its threads read the same weights every token, and remote memory costs more than a few threads add;
  inference off: it gets the compute cores of every node (else they would idle), and a note says it spans;
- `[llm] cpus` wins (the model workers then leave those cores when others remain); inference cores set by
  config (`[inference] workers` / `worker_cpus`) are the operator's sizing: the llm worker shares the model
  workers' cores then, and a note says how to give it its own.

Decode threads = the llm worker's cores (also when pinning is off, so it never spawns one per machine core).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from xcstack.platform.cpulist import format_cpulist
from xcstack.platform.planning.cores import dedup
from xcstack.platform.planning.findings import Findings
from xcstack.platform.planning.overrides import PlanOverrides


@dataclass(frozen=True)
class LLMCores:
    """The llm worker's cores (in core order) and the compute cores left for the model workers."""

    cores: list[int]
    compute: list[int]


def split_request(ov: PlanOverrides, model_req: int | None) -> int | None:
    """The model-worker request the I/O | compute split runs with: with inference off and an llm worker,
    the split is the automatic one (its compute cores go to the llm worker), not "every core serves http"."""
    if ov.llm and model_req == 0:
        return None
    return model_req


def llm_cores(
    ov: PlanOverrides,
    model_req: int | None,
    explicit_compute: bool,
    io: Sequence[int],
    compute: Sequence[int],
    usable: Sequence[int],
    numa: dict[str, list[int]],
    found: Findings,
) -> LLMCores:
    """Phase: carve the llm worker's cores out of the compute cores (nothing when no llm worker runs)."""
    compute = list(compute)
    if not ov.llm:
        return LLMCores([], compute)
    if ov.llm_cpus is not None:
        found.overridden.append("llm_cpus")
        wanted = dedup(ov.llm_cpus)
        mine = [c for c in wanted if c in usable]
        if len(mine) < len(wanted):
            found.warnings.append(
                f"llm cpus {format_cpulist(set(wanted) - set(mine))} are not usable by this process; ignored"
            )
        if mine:
            rest = [c for c in compute if c not in mine]
            return LLMCores(mine, rest if rest or model_req == 0 else compute)
        found.warnings.append("no usable core in llm cpus: using the automatic plan")
    models_on = model_req != 0
    if not compute:  # one usable core (or every core given to http by config)
        cores = list(io)
        found.notes.append(f"llm worker shares the http workers' cores {format_cpulist(cores)}")
        return LLMCores(cores, compute)
    if models_on and (explicit_compute or model_req is not None):
        found.notes.append(
            f"llm worker shares the model workers' cores {format_cpulist(compute)} (inference cores set by "
            "config; [llm] cpus gives it its own)"
        )
        return LLMCores(list(compute), compute)
    node_of = {c: n for n, cl in numa.items() for c in cl}
    nodes = sorted({node_of[c] for c in compute if c in node_of})
    if not models_on:
        if len(nodes) > 1:
            found.notes.append(f"llm worker spans NUMA nodes {', '.join(nodes)} (inference is off: no other use "
                               "for their compute cores)")  # fmt: skip
        return LLMCores(list(compute), [])
    if len(compute) == 1:
        found.notes.append(
            f"llm worker and model worker share core {compute[0]} (one compute core; the http workers keep theirs)"
        )
        return LLMCores(list(compute), compute)
    want = min(len(compute) - 1, math.ceil(len(compute) / 2))
    if len({node_of.get(c) for c in compute}) > 1:
        last = node_of.get(compute[-1])
        same_node = [c for c in compute if node_of.get(c) == last]
        if len(same_node) < want:
            found.notes.append(
                f"llm worker kept on NUMA node {last}: {len(same_node)} cores instead of {want}"
            )
        want = min(want, len(same_node))
        cores = same_node[-want:]
    else:
        cores = compute[-want:]
    return LLMCores(cores, [c for c in compute if c not in cores])
