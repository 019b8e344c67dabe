"""Every vendor/OS fixture tree: detected CPU, OS, io_uring state, and the tuning plan it produces."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from xcstack.platform.plan import derive_plan
from xcstack.platform.probe import probe

from .helpers import FIXTURES, fx


@dataclass
class Expect:
    arch: str
    vendor: str
    model: str  # substring of cpu.model
    os_id: str
    os_version: str
    io_uring: str
    usable: int
    http: list[list[int]]
    model_cpus: list[list[int]]
    cflags: str
    host_cflags: str
    loop: str
    os_source: str = "os-release"
    domestic: bool = True


CASES: dict[str, Expect] = {
    # os-release says Debian, lsb-release says Kylin: Kylin wins. 2 NUMA nodes: one I/O core on each.
    "kunpeng920-kylin-v10": Expect(
        "aarch64", "kunpeng", "Kunpeng 920 (TSV110)", "kylin", "V10", "unsupported", 8,
        [[0], [4]], [[1], [2], [3], [5], [6], [7]],
        "-O3 -march=armv8.2-a+crypto+fp16 -mtune=tsv110",
        "-O3 -march=armv8.2-a+crypto+fp16+dotprod -mtune=tsv110", "uvloop", os_source="lsb-release",
    ),
    # systemd service with CPUQuota=400% under an unlimited slice (cgroup v2, nested path).
    "kunpeng920-openeuler-2203": Expect(
        "aarch64", "kunpeng", "Kunpeng 920", "openeuler", "22.03", "not_probed", 8,
        [[0]], [[1], [2], [3]],
        "-O3 -march=armv8.2-a+crypto+fp16 -mtune=tsv110",
        "-O3 -march=armv8.2-a+crypto+fp16+dotprod -mtune=tsv110", "uvloop",
    ),
    "phytium-ft2000plus-uos20": Expect(
        "aarch64", "phytium", "FT-2000+/64", "uos", "20", "unsupported", 64,
        [[c] for c in (0, 1, 8, 9, 16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57)],
        [[c] for c in (2, 3, 4, 10, 11, 12, 18, 19, 20, 26, 27, 34, 35, 42, 43, 50, 51, 58, 59)],  # memory cap 19
        "-O3 -march=armv8-a+crc", "-O3 -march=armv8-a+crc", "uvloop",
    ),
    "phytium-d2000-kylin-v10": Expect(
        "aarch64", "phytium", "D2000", "kylin", "V10", "unsupported", 8,
        [[0], [1]], [[2], [3], [4], [5], [6], [7]],
        "-O3 -march=armv8-a+crc", "-O3 -march=armv8-a+crc+crypto", "uvloop",
    ),
    "loongson-3a5000-kylin-v10": Expect(
        "loongarch64", "loongson", "Loongson-3A5000", "kylin", "V10", "unsupported", 4,
        [[0]], [[1], [2], [3]], "-O3 -march=loongarch64", "-O3 -march=la464", "asyncio",
    ),
    "loongson-3a6000-uos20": Expect(
        "loongarch64", "loongson", "Loongson-3A6000", "uos", "20", "disabled", 8,
        [[0], [1]], [[2], [3], [4], [5], [6], [7]], "-O3 -march=loongarch64", "-O3 -march=la664", "asyncio",
    ),
    # docker on cgroup v1: cpuset 0-5 of 8, CFS quota 4 cores -> 4 slots.
    "hygon-7285-openeuler-2003": Expect(
        "x86_64", "hygon", "Hygon C86 7285", "openeuler", "20.03", "unsupported", 6,
        [[0]], [[1], [2], [3]], "-O3 -march=znver1", "-O3 -march=znver1", "uvloop",
    ),
    "zhaoxin-kx6000-centaur-kylin": Expect(
        "x86_64", "zhaoxin", "KX-U6780A", "kylin", "v10", "not_probed", 8,
        [[0], [1]], [[2], [3], [4], [5], [6], [7]], "-O3 -march=x86-64-v2", "-O3 -march=x86-64-v2", "uvloop",
    ),
    "zhaoxin-shanghai-openeuler-2203": Expect(
        "x86_64", "zhaoxin", "KX-U6780A", "openeuler", "22.03", "not_probed", 4,
        [[0]], [[1], [2], [3]], "-O3 -march=x86-64-v2", "-O3 -march=x86-64-v2", "uvloop",
    ),
    "intel-xeon-debian12": Expect(
        "x86_64", "intel", "Xeon(R) Gold 6248", "debian", "12", "not_probed", 4,
        [[0]], [[1], [2], [3]], "-O3 -march=x86-64-v2", "-O3 -march=x86-64-v4", "uvloop", domestic=False,
    ),
    "amd-epyc-ubuntu2204": Expect(
        "x86_64", "amd", "EPYC 7763", "ubuntu", "22.04", "not_probed", 16,
        [[0], [1], [8], [9]], [[c] for c in (2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15)],
        "-O3 -march=x86-64-v2", "-O3 -march=x86-64-v3", "uvloop", domestic=False,
    ),
    # cpuset 0-1 of 8 online, cpu.max 150000/100000: 1 http worker on core 0, 1 model worker on core 1.
    "container-cpuset-quota": Expect(
        "x86_64", "intel", "Xeon", "debian", "12", "not_probed", 2,
        [[0]], [[1]], "-O3 -march=x86-64-v2", "-O3 -march=x86-64-v4", "uvloop", domestic=False,
    ),
}  # fmt: skip


def test_every_fixture_tree_has_a_case() -> None:
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_probe_and_plan(name: str) -> None:
    exp = CASES[name]
    report = probe(fx(name))
    assert not report.live
    assert report.arch == exp.arch
    assert report.cpu.vendor == exp.vendor
    assert exp.model in report.cpu.model
    assert report.cpu.domestic is (exp.vendor in {"kunpeng", "phytium", "loongson", "hygon", "zhaoxin"})
    assert report.os.id == exp.os_id
    assert report.os.version_id == exp.os_version
    assert report.os.source == exp.os_source
    assert report.os.domestic is exp.domestic
    assert report.io_uring.status == exp.io_uring
    assert report.io_uring.reason
    assert not report.io_uring.probed  # never a syscall for a file tree
    assert len(report.cpus.usable) == exp.usable
    assert report.errors == []

    plan = derive_plan(report)
    assert plan.http_cpus == exp.http
    assert plan.model_cpus == exp.model_cpus
    assert plan.http_workers == len(exp.http)
    assert plan.model_workers == len(exp.model_cpus)
    io = {c for g in plan.http_cpus for c in g}
    compute = {c for g in plan.model_cpus for c in g}
    assert not io & compute, "I/O and compute cores must be disjoint when there are >= 2 cores"
    assert not plan.shared_cores
    assert (io | compute) <= set(report.cpus.usable)
    assert plan.build.cflags == exp.cflags
    assert plan.build.host_cflags == exp.host_cflags
    assert plan.event_loop == exp.loop
    # JSON-serialisable, round trip
    assert json.loads(report.to_json())["cpu"]["vendor"] == exp.vendor
    assert json.loads(plan.to_json())["build"]["env"]["CFLAGS"] == exp.cflags


def test_kylin_quirk_keeps_both_ids() -> None:
    r = probe(fx("kunpeng920-kylin-v10"))
    assert r.os.os_release_id == "debian"
    assert r.os.lsb_id == "kylin"
    assert r.os.name == "Kylin"
    assert r.os.kernel == "4.19.90-24.4.v2101.ky10.aarch64"
    assert r.os.kernel_version == [4, 19, 90]


def test_kunpeng_details() -> None:
    r = probe(fx("kunpeng920-kylin-v10"))
    assert (r.cpu.implementer, r.cpu.part, r.cpu.core_name) == ("0x48", "0xd01", "TSV110")
    f = r.cpu.features
    assert f["aes"] and f["sha"] and f["crc32"] and f["asimd"] and f["lse"] and f["dotprod"]
    assert not f["sm3"] and not f["sm4"] and not f["sve"]
    assert r.cpus.numa_nodes == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    assert r.cpus.cgroup_version == 1
    assert r.limits.somaxconn == 128
    assert (r.limits.nofile_soft, r.limits.nofile_hard) == (1024, 524288)
    plan = derive_plan(r)
    assert any("somaxconn=128" in w for w in plan.warnings)
    assert any("ulimit -n" in w for w in plan.warnings)


def test_openeuler_nested_cgroup_v2_quota_and_memory() -> None:
    r = probe(fx("kunpeng920-openeuler-2203"))
    assert r.cpus.cgroup_version == 2
    assert r.cpus.cgroup_path == "/system.slice/xcstack.service"
    assert r.cpus.quota_cores == 4.0
    assert r.cpus.budget == 4.0
    assert r.memory.cgroup_limit_bytes == 16 * 2**30
    assert r.os.name == "openEuler"
    plan = derive_plan(r)
    assert plan.cpu_slots == 4
    assert any("CPU quota 4 cores" in n for n in plan.notes)


def test_phytium_ft2000plus_has_no_crypto_and_names_soc_by_core_count() -> None:
    r = probe(fx("phytium-ft2000plus-uos20"))
    assert r.cpu.core_name == "FTC662"
    assert r.cpu.soc_candidates == ["FT-2000+/64"]
    assert not r.cpu.features["aes"] and r.cpu.features["crc32"]
    assert len(r.cpus.numa_nodes) == 8
    plan = derive_plan(r)
    assert any("capped at 19 by memory" in n for n in plan.notes)
    # the capped model workers are spread over all 8 NUMA nodes
    nodes = {c // 8 for g in plan.model_cpus for c in g}
    assert nodes == set(range(8))


def test_loongarch_warns_about_missing_wheels() -> None:
    for name in ("loongson-3a5000-kylin-v10", "loongson-3a6000-uos20"):
        plan = derive_plan(probe(fx(name)))
        assert plan.event_loop == "asyncio" and plan.json_library == "json"
        assert any("no loongarch64 wheels" in w for w in plan.warnings), plan.warnings
        assert any("GCC >= 12" in n for n in plan.build.notes)


def test_loongson_3a6000_lower_case_key_smt_and_io_uring_disabled() -> None:
    r = probe(fx("loongson-3a6000-uos20"))
    assert r.cpu.model == "Loongson-3A6000"
    assert r.cpu.features["lsx"] and r.cpu.features["lasx"]
    assert r.cpus.threads_per_core == 2
    assert r.io_uring.disabled_sysctl == 2
    assert "io_uring_disabled=2" in r.io_uring.reason


def test_hygon_docker_cgroup_v1() -> None:
    r = probe(fx("hygon-7285-openeuler-2003"))
    assert r.cpu.vendor_id == "HygonGenuine"
    assert (r.cpu.family, r.cpu.model_id) == (24, 1)
    assert r.cpus.cgroup_version == 1
    assert r.cpus.cgroup_path == "/docker/3f2a"
    assert r.cpus.cpuset == [0, 1, 2, 3, 4, 5]
    assert r.cpus.quota_cores == 4.0
    assert r.memory.cgroup_limit_bytes == 8 * 2**30
    assert r.io_uring.seccomp_mode == "filter"
    assert not r.cpu.features["avx512"] and r.cpu.features["avx2"]


def test_zhaoxin_vendor_id_spaces_kept() -> None:
    r = probe(fx("zhaoxin-shanghai-openeuler-2203"))
    assert r.cpu.vendor_id == "  Shanghai  "
    assert r.cpu.vendor == "zhaoxin"
    r2 = probe(fx("zhaoxin-kx6000-centaur-kylin"))
    assert r2.cpu.vendor_id == "CentaurHauls"
    assert r2.cpu.x86_level == 2  # no AVX2 reported: x86-64-v2
    assert r2.cpu.features["aes"] and r2.cpu.features["sha"]
    assert any("lujiazui" in n for n in derive_plan(r2).build.notes)


def test_container_quota_cpuset() -> None:
    r = probe(fx("container-cpuset-quota"))
    assert r.cpus.online == list(range(8))
    assert r.cpus.cpuset == [0, 1]
    assert r.cpus.quota_cores == 1.5
    assert r.cpus.budget == 1.5
    assert r.memory.cgroup_limit_bytes == 2 * 2**30
    plan = derive_plan(r)
    assert plan.cpu_slots == 2
    assert any("fractional CPU quota 1.5" in w for w in plan.warnings)
    assert any("cpuset 0-1 of 8" in n for n in plan.notes)


# With an llm worker (the local chat model is there) and inference on: (http cpus, model cpus, llm cpus).
# http keeps the cores of the plan above; the compute cores are halved, the llm worker on the last NUMA node.
LLM_CASES: dict[str, tuple[list[int], list[int], list[int]]] = {
    "amd-epyc-ubuntu2204": ([0, 1, 8, 9], [2, 3, 4, 5, 6, 7], [10, 11, 12, 13, 14, 15]),
    "container-cpuset-quota": ([0], [1], [1]),  # 2 slots: llm and model worker share the compute core
    "hygon-7285-openeuler-2003": ([0], [1], [2, 3]),
    "intel-xeon-debian12": ([0], [1], [2, 3]),
    "kunpeng920-kylin-v10": ([0, 4], [1, 2, 3], [5, 6, 7]),
    "kunpeng920-openeuler-2203": ([0], [1], [2, 3]),
    "loongson-3a5000-kylin-v10": ([0], [1], [2, 3]),
    "loongson-3a6000-uos20": ([0, 1], [2, 3, 4], [5, 6, 7]),
    "phytium-d2000-kylin-v10": ([0, 1], [2, 3, 4], [5, 6, 7]),
    "phytium-ft2000plus-uos20": (  # 8 NUMA nodes: the llm worker keeps to node 7
        [0, 1, 8, 9, 16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57],
        [2, 3, 4, 10, 11, 12, 18, 19, 20, 26, 27, 28, 34, 35, 36, 42, 43, 50, 51],  # memory cap 19
        [58, 59, 60, 61, 62, 63],
    ),
    "zhaoxin-kx6000-centaur-kylin": ([0, 1], [2, 3, 4], [5, 6, 7]),
    "zhaoxin-shanghai-openeuler-2203": ([0], [1], [2, 3]),
}


@pytest.mark.parametrize("name", sorted(LLM_CASES))
def test_fixture_plan_with_an_llm_worker(name: str) -> None:
    from xcstack.platform.planning.overrides import PlanOverrides

    report = probe(fx(name))
    http, model, llm = LLM_CASES[name]
    plan = derive_plan(report, PlanOverrides(llm=True))
    flat = lambda groups: [c for g in groups for c in g]  # noqa: E731
    assert (flat(plan.http_cpus), flat(plan.model_cpus), plan.llm_cpus) == (http, model, llm)
    assert plan.llm_threads == len(llm)
    assert flat(plan.http_cpus) == flat(derive_plan(report).http_cpus)  # http unchanged by the llm worker
    if name != "container-cpuset-quota":
        assert not set(llm) & set(http + model)
    # inference off: every compute core is the llm worker's, http as with inference on
    off = derive_plan(report, PlanOverrides(llm=True, model_workers=0))
    assert flat(off.http_cpus) == http and off.model_workers == 0
    assert set(model) | set(llm) <= set(off.llm_cpus) and not set(off.llm_cpus) & set(http)
