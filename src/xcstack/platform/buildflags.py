"""Recommended compiler flags for building native extensions on each CPU vendor.

Two sets are given:
- `cflags`: the vendor baseline, safe for every machine of that vendor family (build once, deploy to
  the fleet);
- `host_cflags`: tuned to the features this host reports (build here, run here).

Choices, checked with GCC 12.2 (Debian's gcc and aarch64-linux-gnu-gcc-12):
- Kunpeng 920 (TSV110) implements Armv8.2-A. We use `-march=armv8.2-a+crypto+fp16 -mtune=tsv110`, which
  is what GCC's own `-mcpu=tsv110` expands to. The often quoted `-march=armv8-a+crc+crypto
  -mtune=tsv110` (also accepted) leaves out the Armv8.1 LSE atomics (`__ARM_FEATURE_ATOMICS`), which
  matter on 64-128 core Kunpeng servers; CRC32 is mandatory from Armv8.1, so `+crc` is implied.
  `-mtune=tsv110` needs GCC >= 9 (older compilers: the fallback drops it). Such binaries need an
  Armv8.2 CPU: they do not run on Phytium FTC66x cores (Armv8.0).
- Phytium: `-march=armv8-a+crc` (FTC662 has no crypto extension; FTC663 hosts get `+crypto` in
  host_cflags when cpuinfo lists aes/sha2). Upstream GCC has no Phytium `-mtune` value.
- LoongArch: `-march=loongarch64` (GCC >= 12); host: `la464` (3A5000/3C5000, LSX/LASX), `la664`
  (3A6000, GCC >= 14).
- Hygon (Dhyana, Zen 1 derived): `-march=znver1`.
- Zhaoxin: `-march=x86-64-v2` (GCC >= 11; older: `-march=nehalem`). GCC >= 13 knows
  `-march=lujiazui` (KX-6000) and GCC >= 14 `-march=yongfeng` (KX-7000); GCC 12 rejects both.
- Other x86_64: `-march=x86-64-v2` baseline; host_cflags use the detected x86-64 level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from xcstack.platform.cpu import CpuInfo


@dataclass
class BuildFlags:
    target: str  # short name of the target ("kunpeng-920", "phytium", "x86-64-v2", ...)
    cflags: str  # vendor baseline
    host_cflags: str  # tuned to this host's reported features
    fallback_cflags: str = ""  # for compilers older than min_gcc
    min_gcc: str | None = None
    rustflags: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {"CFLAGS": self.cflags, "CXXFLAGS": self.cflags}
        if self.rustflags:
            env["RUSTFLAGS"] = self.rustflags
        return env


def _aarch64_host(cpu: CpuInfo, tune: str | None) -> str:
    flags = set(cpu.flags)
    v81 = "atomics" in flags and "asimdrdm" in flags
    v82 = v81 and ("fphp" in flags or "dcpop" in flags)
    base = "armv8.2-a" if v82 else ("armv8.1-a" if v81 else "armv8-a")
    ext: list[str] = []
    if base == "armv8-a" and "crc32" in flags:
        ext.append("crc")
    if "aes" in flags and "sha2" in flags:
        ext.append("crypto")
    if v82 and "fphp" in flags:
        ext.append("fp16")
    if v82 and "asimddp" in flags:
        ext.append("dotprod")
    if "sha3" in flags:
        ext.append("sha3")
    if "sm3" in flags and "sm4" in flags:
        ext.append("sm4")
    if "sve" in flags:
        ext.append("sve")
    if "sve2" in flags:
        ext.append("sve2")
    if "i8mm" in flags:
        ext.append("i8mm")
    march = base + "".join("+" + e for e in ext)
    out = f"-O3 -march={march}"
    if tune:
        out += f" -mtune={tune}"
    return out


def build_flags(cpu: CpuInfo) -> BuildFlags:
    arch, vendor = cpu.arch, cpu.vendor
    if arch == "aarch64":
        if vendor == "kunpeng":
            bf = BuildFlags(
                target="kunpeng-920" if cpu.part in (None, "0xd01") else f"kunpeng-{cpu.core_name or cpu.part}",
                cflags="-O3 -march=armv8.2-a+crypto+fp16 -mtune=tsv110",
                host_cflags=_aarch64_host(cpu, "tsv110"),
                fallback_cflags="-O3 -march=armv8.2-a+crypto+fp16",
                min_gcc="9",
                rustflags="-C target-cpu=tsv110",
            )
            bf.notes.append(
                "Armv8.2-A + crypto + fp16 tuned for TSV110 (= GCC's -mcpu=tsv110); keeps LSE atomics that "
                "-march=armv8-a+crc+crypto leaves out; needs GCC >= 9 for -mtune=tsv110"
            )
            if cpu.part in ("0xd02", "0xd06"):
                bf.notes.append(
                    f"{cpu.core_name} is newer than TSV110: the baseline is the TSV110 set; host_cflags add "
                    "what cpuinfo reports (e.g. SVE)"
                )
            return bf
        if vendor == "phytium":
            return BuildFlags(
                target="phytium",
                cflags="-O3 -march=armv8-a+crc",
                host_cflags=_aarch64_host(cpu, None),
                rustflags="-C target-feature=+crc",
                notes=[
                    "Phytium FTC66x cores are Armv8.0; FTC662 (FT-2000+/64) has no crypto extension, so the "
                    "baseline omits +crypto; upstream GCC has no Phytium -mtune value"
                ],
            )
        return BuildFlags(
            target="armv8-a",
            cflags="-O3 -march=armv8-a",
            host_cflags=_aarch64_host(cpu, None),
            notes=["generic aarch64: baseline Armv8.0-A; host_cflags follow cpuinfo Features"],
        )
    if arch == "loongarch64":
        model = cpu.model.lower()
        if "3a6000" in model or "3c6000" in model:
            host, note = "-O3 -march=la664", "la664 (3A6000) needs GCC >= 14; GCC 12/13: -march=la464"
        elif cpu.features.get("lasx") or "3a5000" in model or "3c5000" in model:
            host, note = "-O3 -march=la464", "la464 enables LSX/LASX (3A5000/3C5000)"
        else:
            host, note = "-O3 -march=loongarch64", "no LASX reported: generic LoongArch64"
        return BuildFlags(
            target="loongarch64",
            cflags="-O3 -march=loongarch64",
            host_cflags=host,
            min_gcc="12",
            notes=[
                "LoongArch64 needs GCC >= 12 (or the Loongnix/Kylin toolchain); " + note,
                "PyPI has no loongarch64 wheels for uvloop, orjson, onnxruntime, cryptography, granian: "
                "they build from source (C compiler, Rust for orjson/cryptography/granian) or are absent",
            ],
        )
    if arch == "mips64" and vendor == "loongson":
        return BuildFlags(
            target="loongson3a", cflags="-O3 -march=loongson3a -mabi=64", host_cflags="-O3 -march=loongson3a -mabi=64",
            notes=["Loongson MIPS64 (3A1000-3A4000)"],
        )  # fmt: skip
    if arch in {"x86_64", "i686", "i386"}:
        level = cpu.x86_level or 1
        host = f"-O3 -march=x86-64-v{level}" if level >= 2 else "-O3 -march=x86-64"
        if vendor == "hygon":
            return BuildFlags(
                target="znver1",
                cflags="-O3 -march=znver1",
                host_cflags="-O3 -march=znver1",
                min_gcc="6",
                rustflags="-C target-cpu=znver1",
                notes=[f"Hygon Dhyana is Zen 1 derived; host x86-64 level v{level}"],
            )
        if vendor == "zhaoxin":
            return BuildFlags(
                target="x86-64-v2",
                cflags="-O3 -march=x86-64-v2",
                host_cflags=host,
                fallback_cflags="-O3 -march=nehalem -mtune=generic",
                min_gcc="11",
                rustflags="-C target-cpu=x86-64-v2",
                notes=[
                    f"Zhaoxin host x86-64 level v{level}; GCC >= 13 accepts -march=lujiazui (KX-6000), "
                    "GCC >= 14 -march=yongfeng (KX-7000); GCC 12 rejects both"
                ],
            )
        return BuildFlags(
            target="x86-64-v2",
            cflags="-O3 -march=x86-64-v2",
            host_cflags=host,
            fallback_cflags="-O3 -march=nehalem -mtune=generic",
            min_gcc="11",
            rustflags="-C target-cpu=x86-64-v2",
            notes=[f"{cpu.vendor_name} host supports x86-64-v{level}; the baseline stays v2 for portability"],
        )
    return BuildFlags(target=arch or "unknown", cflags="-O2", host_cflags="-O2", notes=[f"no tuning known for {arch}"])


@dataclass
class FlagCheck:
    flags: str
    compiler: str | None
    ok: bool | None  # None: not checked (no compiler)
    message: str = ""


def find_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc.split()[0]
    return shutil.which("gcc") or shutil.which("cc")


def check_cflags(flags: str, compiler: str | None = None, timeout: float = 20.0) -> FlagCheck:
    """Does this host's C compiler accept `flags`? (compiles a one-line C file)."""
    cc = compiler or find_compiler()
    if not cc:
        return FlagCheck(flags, None, None, "no C compiler found ($CC, gcc, cc)")
    with tempfile.TemporaryDirectory(prefix="xcstack-cc-") as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w", encoding="ascii") as fh:
            fh.write("int xcstack_probe(int x) { return x * 3; }\n")
        try:
            proc = subprocess.run(
                [cc, *flags.split(), "-c", src, "-o", os.path.join(tmp, "t.o")],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return FlagCheck(flags, cc, None, f"could not run {cc}: {exc}")
    if proc.returncode == 0:
        return FlagCheck(flags, cc, True, "accepted")
    err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
    return FlagCheck(flags, cc, False, err[:300])
