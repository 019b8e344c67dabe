"""derive_plan on synthetic reports: core counts, overrides, quota, NUMA, memory, event loop."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from xcstack.platform.plan import TuningPlan, apply_affinity, derive_plan
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.probe import PlatformReport, PythonInfo, PythonPackage, probe

from .helpers import fx


def report(
    usable: list[int],
    *,
    quota: float | None = None,
    numa: dict[str, list[int]] | None = None,
    mem_gib: float | None = 64,
    arch: str = "x86_64",
    python: PythonInfo | None = None,
) -> PlatformReport:
    r = probe(fx("intel-xeon-debian12"))
    cpus = dataclasses.replace(
        r.cpus,
        online=list(range(max(usable) + 1)),
        usable=usable,
        cpuset=usable,
        quota_cores=quota,
        cpu_max=None if quota is None else f"{int(quota * 100000)} 100000",
        budget=min(float(len(usable)), quota) if quota is not None else float(len(usable)),
        numa_nodes=numa or {},
    )
    mem = dataclasses.replace(r.memory, total_bytes=int(mem_gib * 2**30) if mem_gib else None)
    return dataclasses.replace(r, cpus=cpus, memory=mem, arch=arch, python=python or r.python)


def flat(groups: list[list[int]]) -> list[int]:
    return [c for g in groups for c in g]


def disjoint(p: TuningPlan) -> bool:
    return not set(flat(p.http_cpus)) & set(flat(p.model_cpus))


def test_one_core_everything_shares_it() -> None:
    p = derive_plan(report([3]))
    assert (p.http_workers, p.model_workers) == (1, 1)
    assert p.http_cpus == [[3]] and p.model_cpus == [[3]]
    assert p.shared_cores
    assert any("one usable core" in n for n in p.notes)


def test_two_cores_http_on_first_model_on_second() -> None:
    p = derive_plan(report([0, 1]))
    assert p.http_cpus == [[0]] and p.model_cpus == [[1]]
    assert not p.shared_cores and disjoint(p)


@pytest.mark.parametrize(("n", "http"), [(3, 1), (4, 1), (5, 2), (8, 2), (16, 4), (64, 16)])
def test_many_cores_quarter_io_rest_compute(n: int, http: int) -> None:
    p = derive_plan(report(list(range(n))))
    assert p.http_workers == http
    assert p.model_workers == n - http
    assert disjoint(p)
    assert sorted(flat(p.http_cpus) + flat(p.model_cpus)) == list(range(n))


def test_respects_cpuset_with_holes() -> None:
    p = derive_plan(report([2, 5, 6, 9]))
    assert set(flat(p.http_cpus) + flat(p.model_cpus)) == {2, 5, 6, 9}
    assert p.http_cpus == [[2]]


def test_quota_limits_slots() -> None:
    p = derive_plan(report(list(range(8)), quota=2.0))
    assert p.cpu_slots == 2
    assert p.http_cpus == [[0]] and p.model_cpus == [[1]]
    assert not any("fractional" in w for w in p.warnings)
    p = derive_plan(report(list(range(8)), quota=0.5))
    assert p.cpu_slots == 1 and p.shared_cores
    assert any("fractional CPU quota 0.5" in w for w in p.warnings)


def test_numa_split_keeps_io_on_every_node() -> None:
    p = derive_plan(report(list(range(8)), numa={"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}))
    assert p.http_cpus == [[0], [4]]
    assert flat(p.model_cpus) == [1, 2, 3, 5, 6, 7]


def test_memory_caps_model_workers() -> None:
    p = derive_plan(report(list(range(16)), mem_gib=2))  # 0.6 * 2 GiB / 512 MiB = 2
    assert p.model_workers == 2
    assert any("capped at 2 by memory" in n for n in p.notes)


def test_override_http_workers() -> None:
    p = derive_plan(report(list(range(8))), PlanOverrides(http_workers=3))
    assert p.http_cpus == [[0], [1], [2]]
    assert flat(p.model_cpus) == [3, 4, 5, 6, 7]
    assert "http_workers" in p.overridden


def test_override_more_http_workers_than_cores_shares_with_warning() -> None:
    p = derive_plan(report([0, 1]), PlanOverrides(http_workers=4, worker_cpus=[0]))
    assert p.http_cpus == [[0], [0], [0], [0]]
    assert p.model_cpus == [[1]]
    assert any("4 http workers on 1 I/O cores" in w for w in p.warnings)


def test_override_worker_cpus_and_unusable_cpu() -> None:
    p = derive_plan(report([0, 1, 2, 3]), PlanOverrides(worker_cpus=[2, 3, 99]))
    assert p.http_cpus == [[2], [3]]
    assert p.model_cpus == [[0], [1]]
    assert any("99" in w and "not usable" in w for w in p.warnings)
    p = derive_plan(report([0, 1, 2, 3]), PlanOverrides(worker_cpus=[42]))
    assert any("automatic plan" in w for w in p.warnings)
    assert p.http_cpus == [[0]]


def test_override_model_workers_zero_gives_all_cores_to_http() -> None:
    p = derive_plan(report(list(range(4))), PlanOverrides(model_workers=0))
    assert p.model_workers == 0 and p.model_cpus == []
    assert p.http_cpus == [[0], [1], [2], [3]]


def test_override_model_workers_count() -> None:
    p = derive_plan(report(list(range(8))), PlanOverrides(model_workers=2))
    assert p.model_workers == 2
    assert p.http_workers == 6
    assert disjoint(p)


def test_override_pin_off() -> None:
    p = derive_plan(report(list(range(4))), PlanOverrides(pin=False))
    assert not p.pin
    assert p.http_cpus == [[]] and all(g == [] for g in p.model_cpus)
    assert p.model_workers == 3


def test_event_loop_choice() -> None:
    no_uvloop = PythonInfo(probed=True, packages=[PythonPackage("uvloop", "uvloop", "", False)])
    p = derive_plan(report([0, 1], python=no_uvloop))
    assert p.event_loop == "asyncio" and p.json_library == "json"
    p = derive_plan(report([0, 1], python=no_uvloop), PlanOverrides(event_loop="uvloop"))
    assert p.event_loop == "asyncio"
    assert any("uvloop is not importable" in w for w in p.warnings)
    assert any("onnxruntime is not importable" in w for w in p.warnings)
    yes = PythonInfo(probed=True, packages=[PythonPackage("uvloop", "uvloop", "", True, "0.21")])
    assert derive_plan(report([0, 1], python=yes)).event_loop == "uvloop"
    assert derive_plan(report([0, 1], python=yes), PlanOverrides(event_loop="asyncio")).event_loop == "asyncio"


def test_backlog_above_somaxconn_warns() -> None:
    r = probe(fx("kunpeng920-kylin-v10"))
    p = derive_plan(r, PlanOverrides(backlog=2048))
    assert any("server.backlog=2048" in w for w in p.warnings)


def test_overrides_from_settings(tmp_path: os.PathLike[str]) -> None:
    from xcstack.config import load_settings

    cfg = os.path.join(tmp_path, "x.toml")
    with open(cfg, "w") as fh:
        fh.write('[server]\nworkers = 2\nworker_cpus = [0]\npin_cpus = false\nloop = "asyncio"\n')
    ov = PlanOverrides.from_settings(load_settings(cfg))
    assert (ov.http_workers, ov.worker_cpus, ov.pin, ov.event_loop) == (2, [0], False, "asyncio")
    ov = PlanOverrides.from_settings(load_settings(None))
    assert (ov.http_workers, ov.worker_cpus, ov.pin) == (None, None, None)


def test_apply_affinity_allowed_and_refused(caplog: pytest.LogCaptureFixture) -> None:
    before = os.sched_getaffinity(0)
    try:
        target = sorted(before)[:1]
        assert apply_affinity(target) is True
        assert os.sched_getaffinity(0) == set(target)
        with caplog.at_level(logging.WARNING, logger="xcstack.platform"):
            assert apply_affinity([100000]) is False
        assert "not permitted" in caplog.text
        assert os.sched_getaffinity(0) == set(target)  # unchanged
        assert apply_affinity([]) is False
    finally:
        os.sched_setaffinity(0, before)


def test_apply_affinity_without_sched_setaffinity(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, "sched_setaffinity")
    with caplog.at_level(logging.WARNING, logger="xcstack.platform"):
        assert apply_affinity([0]) is False
    assert "not available" in caplog.text


def test_plan_json_round_trip_and_pin_current_process() -> None:
    p = derive_plan(report([0, 1]))
    q = TuningPlan.from_json(p.to_json())
    assert q == p
    assert q.model_worker_env["OMP_NUM_THREADS"] == "1"
    before = os.sched_getaffinity(0)
    try:
        allowed = sorted(before)
        p2 = derive_plan(report(allowed))
        assert p2.pin_current_process("http", 0) is True
        assert os.sched_getaffinity(0) == set(p2.http_cpus[0])
        assert p2.pin_current_process("model", 99) is False  # no such worker
        off = derive_plan(report(allowed), PlanOverrides(pin=False))
        assert off.pin_current_process("http", 0) is False
        with pytest.raises(ValueError):
            p2.pin_current_process("gpu", 0)
    finally:
        os.sched_setaffinity(0, before)


def test_plan_for_settings_live() -> None:
    from xcstack.config import load_settings
    from xcstack.platform import plan_for_settings

    r, p = plan_for_settings(load_settings(None), onnxruntime_providers=False)
    assert r.live and p.http_workers >= 1


def test_override_per_model_worker_cpus() -> None:
    p = derive_plan(report(list(range(8))), PlanOverrides(model_worker_cpus=[[4, 5], [6, 7], [99]]))
    assert p.model_cpus == [[4, 5], [6, 7]]
    assert p.http_cpus == [[0], [1], [2], [3]]  # the other cores serve http
    assert not p.shared_cores
    assert p.compute_cores == [4, 5, 6, 7]
    assert any("99" in w for w in p.warnings)
    p = derive_plan(report(list(range(4))), PlanOverrides(model_cpus=[2, 3]))
    assert p.model_cpus == [[2], [3]] and p.http_cpus == [[0], [1]]


def write_cfg(tmp_path: os.PathLike[str], text: str) -> str:
    cfg = os.path.join(tmp_path, "x.toml")
    with open(cfg, "w") as fh:
        fh.write(text)
    return cfg


def test_derive_plan_accepts_settings(tmp_path: os.PathLike[str]) -> None:
    from xcstack.config import load_settings

    s = load_settings(write_cfg(tmp_path, "[server]\nworkers = 2\n[inference]\nworkers = 1\nworker_cpus = [[3]]\n"))
    p = derive_plan(report(list(range(4))), s)
    assert p.http_workers == 2 and p.model_cpus == [[3]]
    assert p.http_cpus == [[0], [1]]


@pytest.mark.parametrize("table", ['[inference]\nmode = "inline"\n', "[inference]\nenabled = false\n"])
def test_inline_or_disabled_inference_gives_every_core_to_http(tmp_path: os.PathLike[str], table: str) -> None:
    from xcstack.config import load_settings

    ov = PlanOverrides.from_settings(load_settings(write_cfg(tmp_path, table)))
    assert ov.model_workers == 0
    p = derive_plan(report(list(range(4))), ov)
    assert p.model_workers == 0 and p.http_cpus == [[0], [1], [2], [3]]


def test_smt_io_workers_share_a_physical_core_not_with_model_workers() -> None:
    # Intel-style numbering: cpu i and i+4 are the two threads of physical core i
    r = report(list(range(8)))
    r = dataclasses.replace(r, cpus=dataclasses.replace(r.cpus, smt_siblings=[[i, i + 4] for i in range(4)]))
    p = derive_plan(r)
    assert p.http_cpus == [[0], [4]]
    assert sorted(flat(p.model_cpus)) == [1, 2, 3, 5, 6, 7]
    # a quota of 4 cores takes 4 distinct physical cores
    r2 = dataclasses.replace(r, cpus=dataclasses.replace(r.cpus, quota_cores=4.0, budget=4.0))
    p2 = derive_plan(r2)
    assert sorted(flat(p2.http_cpus) + flat(p2.model_cpus)) == [0, 1, 2, 3]


def test_smt_siblings_from_sysfs() -> None:
    r = probe(fx("loongson-3a6000-uos20"))
    assert r.cpus.smt_siblings == [[0, 1], [2, 3], [4, 5], [6, 7]]
    p = derive_plan(r)
    assert p.http_cpus == [[0], [1]]  # one physical core for I/O
    h = probe(fx("hygon-7285-openeuler-2003"))
    assert h.cpus.smt_siblings == [[0, 4], [1, 5]]  # 6 and 7 are outside the cpuset
