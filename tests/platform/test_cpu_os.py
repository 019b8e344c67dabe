"""identify_cpu / identify_os on inline texts: the variants the fixture trees do not cover."""

from __future__ import annotations

import pytest

from xcstack.platform.cpu import identify_cpu, infer_arch, parse_cpuinfo, x86_level
from xcstack.platform.cpulist import format_cpulist, parse_cpulist
from xcstack.platform.osinfo import identify_os, kernel_tuple, parse_env_file


def arm(impl: str, part: str, n: int = 4, features: str = "fp asimd", extra: str = "") -> str:
    return "\n".join(
        f"processor\t: {i}\nFeatures\t: {features}\nCPU implementer\t: {impl}\nCPU architecture: 8\n"
        f"CPU variant\t: 0x1\nCPU part\t: {part}\nCPU revision\t: 0\n{extra}"
        for i in range(n)
    )


@pytest.mark.parametrize(
    ("part", "core", "model"),
    [("0xd01", "TSV110", "Kunpeng 920 (TSV110)"), ("0xd02", "HIP09", "Kunpeng (HIP09 core)"),
     ("0xd06", "HIP12", "Kunpeng (HIP12 core)")],
)  # fmt: skip
def test_kunpeng_parts(part: str, core: str, model: str) -> None:
    c = identify_cpu(arm("0x48", part), "aarch64")
    assert (c.vendor, c.core_name, c.model) == ("kunpeng", core, model)
    assert c.vendor_name == "HiSilicon Kunpeng" and c.domestic


def test_kunpeng_unknown_part_and_model_name_line_wins() -> None:
    c = identify_cpu(arm("0x48", "0xd40"), "aarch64")
    assert c.vendor == "kunpeng" and c.model == "HiSilicon part 0xd40"
    c = identify_cpu(arm("0x48", "0xd01", extra="model name\t: HUAWEI Kunpeng 920 5250\n"), "aarch64")
    assert c.model == "HUAWEI Kunpeng 920 5250"


@pytest.mark.parametrize(
    ("part", "n", "socs"),
    [("0x660", 16, ["FT-1500A"]), ("0x661", 8, ["FT-2000A"]), ("0x662", 64, ["FT-2000+/64"]),
     ("0x663", 4, ["FT-2000/4"]), ("0x663", 8, ["D2000"]), ("0x663", 64, ["S2500"]),
     ("0x663", 16, ["FT-2000/4", "D2000", "S2500"])],
)  # fmt: skip
def test_phytium_parts_name_core_not_soc(part: str, n: int, socs: list[str]) -> None:
    c = identify_cpu(arm("0x70", part, n=n), "aarch64")
    assert c.vendor == "phytium"
    assert c.core_name == "FTC" + part[2:]
    assert c.soc_candidates == socs
    if len(socs) > 1:
        assert "SoC not identified" in c.model
    else:
        assert f"likely {socs[0]}" in c.model


def test_arm_generic_and_other_implementers() -> None:
    assert identify_cpu(arm("0x41", "0xd0c"), "aarch64").vendor == "arm"
    c = identify_cpu(arm("0xc0", "0xac3"), "aarch64")
    assert c.vendor == "generic" and c.model.startswith("Ampere")


def test_loongarch_keys_are_case_insensitive() -> None:
    for key in ("Model Name", "model name", "MODEL NAME"):
        text = f"system type\t\t: generic-loongson-machine\n\nprocessor\t\t: 0\n{key}\t\t: Loongson-3A5000\n"
        c = identify_cpu(text, "loongarch64")
        assert (c.vendor, c.model) == ("loongson", "Loongson-3A5000")
    assert infer_arch("processor : 0\nISA : loongarch32r loongarch64\n") == "loongarch64"


def test_loongson_from_system_type_only_and_mips() -> None:
    c = identify_cpu(
        "system type\t: generic-loongson-machine\nprocessor\t: 0\ncpu model\t: Loongson-3 V0.4\n", "mips64"
    )
    assert c.vendor == "loongson"
    c = identify_cpu("processor : 0\nsystem type : generic-loongson-machine\n", "loongarch64")
    assert c.vendor == "loongson"
    assert infer_arch("system type : generic-loongson-machine\ncpu model : Loongson-3 V0.4 FPU V0.1\n") == "mips64"


def x86(vendor: str, name: str, flags: str = "fpu lm sse4_2", family: int = 6) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 1\nmodel name\t: {name}\n"
            f"flags\t\t: {flags}\n")  # fmt: skip


@pytest.mark.parametrize(
    ("vendor_id", "name", "expected"),
    [("GenuineIntel", "Intel Xeon", "intel"), ("AuthenticAMD", "AMD EPYC", "amd"),
     ("HygonGenuine", "Hygon C86 7285 32-core Processor", "hygon"),
     ("CentaurHauls", "ZHAOXIN KaiXian KX-U6780A@2.7GHz", "zhaoxin"),
     ("  Shanghai  ", "ZHAOXIN KaiXian KX-U6780A@2.7GHz", "zhaoxin"),
     ("CentaurHauls", "VIA Nano processor U3500@1000MHz", "generic"),
     ("WeirdVendor", "x", "generic")],
)  # fmt: skip
def test_x86_vendors(vendor_id: str, name: str, expected: str) -> None:
    c = identify_cpu(x86(vendor_id, name), "x86_64")
    assert c.vendor == expected
    assert c.vendor_id == vendor_id
    assert infer_arch(x86(vendor_id, name)) == "x86_64"


def test_zhaoxin_gmi_reports_sm3_sm4() -> None:
    c = identify_cpu(x86("  Shanghai  ", "ZHAOXIN KX-7000", "lm sse4_2 ccs ccs_en ace phe"), "x86_64")
    assert c.features["sm3"] and c.features["sm4"] and c.features["aes"] and c.features["sha"]


def test_x86_levels() -> None:
    v2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
    v3 = v2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert (x86_level(set()), x86_level(v2), x86_level(v3), x86_level(v4)) == (1, 2, 3, 4)
    assert x86_level(v2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}) == 2  # levels are cumulative


def test_arm_sm_features() -> None:
    c = identify_cpu(arm("0x41", "0xd49", features="fp asimd aes sha2 sha3 sm3 sm4 crc32 atomics sve sve2"), "aarch64")
    f = c.features
    assert f["sm3"] and f["sm4"] and f["sve2"] and f["lse"]


def test_parse_cpuinfo_blank_and_garbage() -> None:
    assert parse_cpuinfo("") == []
    c = identify_cpu("", "x86_64")
    assert c.vendor == "generic" and c.model == "unknown" and c.logical_cpus == 0


def test_cpulist_round_trip() -> None:
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("0-7:2") == [0, 2, 4, 6]
    assert parse_cpulist("") is None and parse_cpulist("x") is None and parse_cpulist("3-1") is None
    assert format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_cpulist([]) == ""


# --- OS


def test_os_release_quoting_and_openeuler_case() -> None:
    osr = 'NAME="openEuler"\nVERSION="22.03 (LTS-SP1)"\nID="openEuler"\nVERSION_ID="22.03"\n# comment\nX=\'a b\'\n'
    env = parse_env_file(osr)
    assert env["ID"] == "openEuler" and env["X"] == "a b"
    o = identify_os(osr)
    assert (o.id, o.name, o.version_id, o.family, o.domestic) == ("openeuler", "openEuler", "22.03", "rhel", True)


def test_lsb_overrides_only_for_domestic() -> None:
    deb = "ID=debian\nVERSION_ID=10\n"
    assert identify_os(deb, "DISTRIB_ID=Kylin\nDISTRIB_RELEASE=V10\n").id == "kylin"
    assert identify_os(deb, "DISTRIB_ID=Uos\nDISTRIB_RELEASE=20\n").id == "uos"
    assert identify_os(deb, "DISTRIB_ID=Ubuntu\n").id == "debian"  # a generic lsb id never overrides
    assert identify_os(None, "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=22.04\n").id == "ubuntu"
    assert identify_os(None, None).id == "unknown"


def test_kylin_release_file_counts_as_evidence() -> None:
    o = identify_os("ID=debian\n", None, {"kylin-release": "Kylin Linux Advanced Server release V10 (Sword)\n"})
    assert o.id == "kylin" and o.source == "kylin-release"
    assert o.pretty_name.startswith("Kylin Linux Advanced Server")


OS_CASES = [
    ('ID=uos\nNAME="UnionTech OS Server 20"\n', "uos", "rhel"),
    ('ID=uos\nNAME="uos"\nPRETTY_NAME="UOS Desktop"', "uos", "debian"),
    ('ID="kylin"\nNAME="Kylin Linux Advanced Server"', "kylin", "rhel"),
    ("ID=kylin\nID_LIKE=debian", "kylin", "debian"),
    ('ID=centos\nID_LIKE="rhel fedora"', "centos", "rhel"),
    ("ID=anolis", "anolis", "rhel"),
    ("ID=deepin", "deepin", "debian"),
    ("ID=alpine", "alpine", "other"),
]


@pytest.mark.parametrize(("osr", "expected", "family"), OS_CASES)
def test_os_ids(osr: str, expected: str, family: str) -> None:
    o = identify_os(osr)
    assert o.id == expected and o.family == family


def test_kernel_tuple() -> None:
    assert kernel_tuple("4.19.90-24.4.v2101.ky10.aarch64") == [4, 19, 90]
    assert kernel_tuple("6.6.0-loong64") == [6, 6, 0]
    assert kernel_tuple("6.18") == [6, 18]
    assert kernel_tuple("") == []
