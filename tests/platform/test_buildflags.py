"""Per-vendor build flags, and that the compilers at hand accept them."""

from __future__ import annotations

import platform
import shutil

import pytest

from xcstack.platform.buildflags import build_flags, check_cflags
from xcstack.platform.cpu import identify_cpu
from xcstack.platform.probe import probe

from .helpers import FIXTURES, fx


def test_unknown_arch_and_generic_arm() -> None:
    bf = build_flags(identify_cpu("processor : 0\n", "s390x"))
    assert bf.cflags == "-O2"
    arm = identify_cpu("processor : 0\nFeatures : fp asimd crc32 atomics asimdrdm fphp dcpop\nCPU implementer : 0x41\n"
                       "CPU part : 0xd0c\n", "aarch64")  # fmt: skip
    bf = build_flags(arm)
    assert bf.cflags == "-O3 -march=armv8-a"
    assert bf.host_cflags == "-O3 -march=armv8.2-a+fp16"


def test_kunpeng_hip09_gets_sve_in_host_flags() -> None:
    text = ("processor : 0\nFeatures : fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimdrdm dcpop asimddp "
            "sve\nCPU implementer : 0x48\nCPU part : 0xd02\n")  # fmt: skip
    bf = build_flags(identify_cpu(text, "aarch64"))
    assert bf.cflags == "-O3 -march=armv8.2-a+crypto+fp16 -mtune=tsv110"
    assert "+sve" in bf.host_cflags and bf.target == "kunpeng-HIP09"
    assert bf.env["RUSTFLAGS"] == "-C target-cpu=tsv110"


def test_host_compiler_accepts_this_machines_flags() -> None:
    r = probe(python=False)
    bf = build_flags(r.cpu)
    for flags in (bf.cflags, bf.host_cflags):
        chk = check_cflags(flags)
        if chk.ok is None:
            pytest.skip(chk.message)
        assert chk.ok, chk.message


def test_check_cflags_reports_rejection() -> None:
    chk = check_cflags("-march=definitely-not-a-cpu")
    if chk.ok is None:
        pytest.skip(chk.message)
    assert chk.ok is False and chk.message


def test_check_cflags_without_compiler() -> None:
    chk = check_cflags("-O2", compiler="/nonexistent/cc")
    assert chk.ok is None and "could not run" in chk.message


CROSS = {
    "aarch64": shutil.which("aarch64-linux-gnu-gcc") or shutil.which("aarch64-linux-gnu-gcc-12"),
    "loongarch64": shutil.which("loongarch64-linux-gnu-gcc"),
    "x86_64": shutil.which("gcc") if platform.machine() == "x86_64" else shutil.which("x86_64-linux-gnu-gcc"),
}


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_fixture_flags_accepted_by_a_matching_compiler(name: str) -> None:
    """Runs where a (cross) compiler for the fixture's architecture is installed, e.g. Debian's
    gcc-12-aarch64-linux-gnu; skipped elsewhere."""
    r = probe(fx(name))
    cc = CROSS.get(r.arch)
    if not cc:
        pytest.skip(f"no C compiler for {r.arch}")
    bf = build_flags(r.cpu)
    for flags in dict.fromkeys([bf.cflags, bf.host_cflags]):
        chk = check_cflags(flags, compiler=cc)
        assert chk.ok, f"{cc} {flags}: {chk.message}"
