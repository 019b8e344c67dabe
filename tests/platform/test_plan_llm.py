"""The llm worker's cores in the tuning plan (platform/planning/llm.py): its own compute cores, split from
the model workers', threads = its cores, deterministic; no llm worker: the plan is what it always was."""

from __future__ import annotations

import pytest

from xcstack.platform.doctor import DoctorResult, render_text
from xcstack.platform.plan import TuningPlan, derive_plan
from xcstack.platform.planning.overrides import PlanOverrides

from .test_plan import flat, report

LLM = PlanOverrides(llm=True)
LLM_NO_INFERENCE = PlanOverrides(llm=True, model_workers=0)


def cores(p: TuningPlan) -> tuple[list[int], list[int], list[int]]:
    return flat(p.http_cpus), flat(p.model_cpus), p.llm_cpus


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_without_an_llm_worker_the_plan_is_unchanged(n: int) -> None:
    r = report(list(range(n)))
    p = derive_plan(r, PlanOverrides(llm=False))
    assert p == derive_plan(r) and p.llm_cpus == [] and p.llm_threads == 0


@pytest.mark.parametrize(("n", "inference_on", "http", "model", "llm"), [
    (1, True, [0], [0], [0]),  # one core: everything shares it
    (1, False, [0], [], [0]),
    (2, True, [0], [1], [1]),  # one compute core: llm and model worker share it, http keeps its own
    (2, False, [0], [], [1]),  # inference off: the compute core is the llm worker's (was: 2 http workers)
    (3, True, [0], [1], [2]),
    (4, True, [0], [1], [2, 3]),
    (4, False, [0], [], [1, 2, 3]),
    (8, True, [0, 1], [2, 3, 4], [5, 6, 7]),
    (8, False, [0, 1], [], [2, 3, 4, 5, 6, 7]),
    (16, True, [0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]),
])
def test_split(n: int, inference_on: bool, http: list[int], model: list[int], llm: list[int]) -> None:
    p = derive_plan(report(list(range(n))), LLM if inference_on else LLM_NO_INFERENCE)
    assert cores(p) == (http, model, llm)
    assert p.llm_threads == len(llm)  # threads = its cores
    assert p.model_workers == len(model) and p.http_workers == len(http)
    if n >= 3:  # its own cores: disjoint from http and model workers
        assert not set(llm) & (set(http) | set(model))
    if n == 2 and inference_on:
        assert any("llm worker and model worker share core 1" in x for x in p.notes), p.notes
    assert derive_plan(report(list(range(n))), LLM if inference_on else LLM_NO_INFERENCE) == p  # deterministic


def test_numa_keeps_the_llm_worker_on_one_node_when_model_workers_run() -> None:
    numa = {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    p = derive_plan(report(list(range(8)), numa=numa), LLM)
    assert cores(p) == ([0, 4], [1, 2, 3], [5, 6, 7])
    numa4 = {str(i): [2 * i, 2 * i + 1] for i in range(8)}  # 8 nodes of 2 cores: at most one node's cores
    p = derive_plan(report(list(range(16)), numa=numa4), LLM)
    assert len(p.llm_cpus) <= 2 and len({c // 2 for c in p.llm_cpus}) == 1
    assert any("kept on NUMA node" in x for x in p.notes), p.notes
    off = derive_plan(report(list(range(8)), numa=numa), LLM_NO_INFERENCE)
    assert off.llm_cpus == [1, 2, 3, 5, 6, 7] and any("spans NUMA nodes 0, 1" in x for x in off.notes)


def test_llm_cpus_from_config_win_and_model_workers_leave_them() -> None:
    p = derive_plan(report(list(range(8))), PlanOverrides(llm=True, llm_cpus=[7, 6, 6, 42]))
    assert p.llm_cpus == [7, 6] and p.llm_threads == 2 and "llm_cpus" in p.overridden
    assert not {6, 7} & set(flat(p.model_cpus)) and flat(p.model_cpus)
    assert any("42" in w and "not usable" in w for w in p.warnings)
    p = derive_plan(report(list(range(8))), PlanOverrides(llm=True, llm_cpus=[99]))
    assert p.llm_cpus == [5, 6, 7] and any("no usable core in llm cpus" in w for w in p.warnings)


def test_inference_cores_set_by_config_are_shared_with_a_note() -> None:
    p = derive_plan(report(list(range(8))), PlanOverrides(llm=True, model_workers=2))
    assert p.llm_cpus == flat(p.model_cpus) == [6, 7]
    assert any("shares the model workers' cores 6-7" in x for x in p.notes), p.notes
    p = derive_plan(report(list(range(8))), PlanOverrides(llm=True, model_worker_cpus=[[4, 5], [6, 7]]))
    assert p.llm_cpus == [4, 5, 6, 7]


def test_pinning_off_leaves_it_unpinned_with_threads_still_its_share() -> None:
    p = derive_plan(report(list(range(8))), PlanOverrides(llm=True, pin=False))
    assert p.llm_cpus == [] and p.llm_threads == 3


def test_plan_json_round_trip_keeps_the_llm_cores() -> None:
    p = derive_plan(report(list(range(4))), LLM)
    q = TuningPlan.from_json(p.to_json())
    assert (q.llm_cpus, q.llm_threads) == ([2, 3], 2)


def test_doctor_text_shows_the_llm_worker_cores_only_when_one_runs() -> None:
    r = report(list(range(4)))
    with_llm = render_text(DoctorResult(r, derive_plan(r, LLM)))
    line = next(x for x in with_llm.splitlines() if "llm worker" in x)
    assert "2 thread(s) on cpus 2-3" in line, line
    assert "llm worker" not in render_text(DoctorResult(r, derive_plan(r, PlanOverrides(llm=False))))
