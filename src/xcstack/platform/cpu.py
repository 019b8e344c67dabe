"""CPU identification from /proc/cpuinfo text: vendor, model and the features that matter.

Pure functions over text, so every vendor is testable with fixture files. Formats handled:

- x86 (`vendor_id`, `cpu family`, `model`, `model name`, `flags`): Intel `GenuineIntel`, AMD
  `AuthenticAMD`, Hygon `HygonGenuine`, Zhaoxin `CentaurHauls` or `  Shanghai  ` (note the spaces).
- arm64 (`CPU implementer`, `CPU part`, `Features`; usually no model name): HiSilicon Kunpeng
  implementer 0x48 (part 0xd01 = Kunpeng 920 / TSV110, 0xd02 = HIP09, 0xd06 = HIP12), Phytium
  implementer 0x70 (parts 0x660-0x663 = FTC660-FTC663 cores; the part alone does not name the SoC).
- LoongArch (`Model Name`, `CPU Family`, `system type`, `ISA`, `Features`; key case varies between
  kernels) and Loongson MIPS (`cpu model`, `system type`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# (implementer, part) -> (vendor key, model)
KUNPENG_PARTS: dict[int, str] = {
    0xD01: "Kunpeng 920 (TSV110)",
    0xD02: "Kunpeng (HIP09 core)",
    0xD06: "Kunpeng (HIP12 core)",
}
PHYTIUM_PARTS: dict[int, str] = {0x660: "FTC660", 0x661: "FTC661", 0x662: "FTC662", 0x663: "FTC663"}
# SoCs commonly built from each Phytium core. The MIDR part names the core only; the SoC is a guess
# refined by the core count (see _phytium_soc).
PHYTIUM_SOCS: dict[int, list[str]] = {
    0x660: ["FT-1500A"],
    0x661: ["FT-2000A"],
    0x662: ["FT-2000+/64"],
    0x663: ["FT-2000/4", "D2000", "S2500"],
}

ARM_IMPLEMENTERS: dict[int, str] = {
    0x41: "ARM",
    0x42: "Broadcom",
    0x43: "Cavium",
    0x46: "Fujitsu",
    0x48: "HiSilicon",
    0x4E: "NVIDIA",
    0x50: "APM",
    0x51: "Qualcomm",
    0x61: "Apple",
    0x70: "Phytium",
    0xC0: "Ampere",
}

DOMESTIC_VENDORS = frozenset({"kunpeng", "phytium", "loongson", "hygon", "zhaoxin"})

VENDOR_NAMES: dict[str, str] = {
    "kunpeng": "HiSilicon Kunpeng",
    "phytium": "Phytium",
    "loongson": "Loongson",
    "hygon": "Hygon",
    "zhaoxin": "Zhaoxin",
    "intel": "Intel",
    "amd": "AMD",
    "arm": "ARM",
    "generic": "generic",
}

# Normalised feature names reported for every CPU (False where the ISA has no such thing).
FEATURE_KEYS = (
    "aes", "sha", "sha512", "sm3", "sm4", "crc32", "pmull", "simd",
    "sse4_2", "avx", "avx2", "avx512", "asimd", "sve", "sve2", "lse", "dotprod", "i8mm",
    "lsx", "lasx",
)  # fmt: skip

_X86_LEVELS: list[tuple[int, frozenset[str]]] = [
    (2, frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})),
    (3, frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})),
    (4, frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
]


@dataclass
class CpuInfo:
    arch: str
    vendor: str  # kunpeng | phytium | loongson | hygon | zhaoxin | intel | amd | arm | generic
    vendor_name: str
    model: str  # human-readable model ("Kunpeng 920 (TSV110)", "Hygon C86 7285 32-core Processor")
    model_raw: str = ""  # the model line exactly as cpuinfo had it, "" when there is none
    vendor_id: str = ""  # x86 vendor_id string as found (spaces kept)
    implementer: str | None = None  # arm64 "0x48"
    part: str | None = None  # arm64 "0xd01"
    core_name: str | None = None  # arm64 core (TSV110, FTC662, ...)
    family: int | None = None  # x86 cpu family
    model_id: int | None = None  # x86 model number
    soc_candidates: list[str] = field(default_factory=list)
    logical_cpus: int = 0  # processors listed in cpuinfo
    threads_per_core: int | None = None
    flags: list[str] = field(default_factory=list)
    features: dict[str, bool] = field(default_factory=dict)
    x86_level: int | None = None  # x86-64 micro-architecture level 1-4
    domestic: bool = False


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """Blocks of `key : value`; keys lower-cased with inner whitespace collapsed, values stripped."""
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        k = " ".join(key.split()).lower()
        if k and k not in cur:
            cur[k] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def _int(value: str | None, base: int = 10) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip(), base)
    except ValueError:
        return None


def _merged(blocks: list[dict[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for b in blocks:
        for k, v in b.items():
            merged.setdefault(k, v)
    return merged


def infer_arch(text: str) -> str | None:
    """Guess the architecture a cpuinfo text came from (for fixture trees)."""
    g = _merged(parse_cpuinfo(text))
    isa = g.get("isa", "").lower()
    if "loongarch64" in isa or "loongarch" in g.get("cpu family", "").lower():
        return "loongarch64"
    if "model name" in g and "loongson-3a5" in g["model name"].lower():
        return "loongarch64"
    if "cpu implementer" in g:
        return "armv7l" if g.get("cpu architecture", "8").strip() in {"7", "AArch32"} else "aarch64"
    if "vendor_id" in g:
        return "x86_64" if "lm" in g.get("flags", "").split() else "i686"
    if "mips64" in isa or "loongson" in g.get("cpu model", "").lower():
        return "mips64"
    if "isa" in g and isa.startswith("rv64"):
        return "riscv64"
    return None


def x86_level(flags: set[str]) -> int:
    level = 1
    for lvl, need in _X86_LEVELS:
        if need <= flags:
            level = lvl
        else:
            break
    return level


def _features(arch: str, vendor: str, flags: set[str]) -> dict[str, bool]:
    f = dict.fromkeys(FEATURE_KEYS, False)
    if arch in {"x86_64", "i686", "i386"}:
        f["aes"] = "aes" in flags or (vendor == "zhaoxin" and "ace" in flags)
        f["sha"] = "sha_ni" in flags or (vendor == "zhaoxin" and "phe" in flags)
        f["sha512"] = "sha512" in flags
        # Intel AVX-SM3/SM4 report `sm3`/`sm4`; Zhaoxin's GMI engine reports `ccs` (SM3/SM4).
        f["sm3"] = "sm3" in flags or "ccs" in flags
        f["sm4"] = "sm4" in flags or "ccs" in flags
        f["crc32"] = "sse4_2" in flags
        f["pmull"] = "pclmulqdq" in flags
        f["sse4_2"] = "sse4_2" in flags
        f["avx"] = "avx" in flags
        f["avx2"] = "avx2" in flags
        f["avx512"] = "avx512f" in flags
        f["simd"] = f["sse4_2"]
    elif arch in {"aarch64", "armv7l", "armv8l"}:
        f["aes"] = "aes" in flags
        f["sha"] = "sha2" in flags or "sha1" in flags
        f["sha512"] = "sha512" in flags
        f["sm3"] = "sm3" in flags
        f["sm4"] = "sm4" in flags
        f["crc32"] = "crc32" in flags
        f["pmull"] = "pmull" in flags
        f["asimd"] = "asimd" in flags or "neon" in flags
        f["sve"] = "sve" in flags
        f["sve2"] = "sve2" in flags
        f["lse"] = "atomics" in flags
        f["dotprod"] = "asimddp" in flags
        f["i8mm"] = "i8mm" in flags
        f["simd"] = f["asimd"]
    elif arch == "loongarch64":
        f["lsx"] = "lsx" in flags
        f["lasx"] = "lasx" in flags
        f["crc32"] = "crc32" in flags
        f["aes"] = f["sha"] = "crypto" in flags  # LoongArch reports one `crypto` bit
        f["simd"] = f["lsx"]
    return f


def _phytium_soc(part: int, ncpu: int) -> list[str]:
    cands = list(PHYTIUM_SOCS.get(part, []))
    if part == 0x663:
        if ncpu and ncpu <= 4:
            return ["FT-2000/4"]
        if ncpu == 8:
            return ["D2000"]
        if ncpu >= 32:
            return ["S2500"]
    if part == 0x662 and ncpu >= 32:
        return ["FT-2000+/64"]
    return cands


def identify_cpu(text: str, arch: str) -> CpuInfo:
    """Identify vendor/model/features from /proc/cpuinfo text for the given architecture."""
    blocks = parse_cpuinfo(text)
    g = _merged(blocks)
    procs = sum(1 for b in blocks if _int(b.get("processor")) is not None)
    if procs == 0 and g:
        procs = 1
    flag_text = g.get("flags") or g.get("features") or ""
    flags = set(flag_text.lower().split())

    model_raw = ""
    for key in ("model name", "cpu model", "hardware"):
        if g.get(key):
            model_raw = g[key]
            break
    model = " ".join(model_raw.split())
    vendor = "generic"
    info = CpuInfo(arch=arch, vendor=vendor, vendor_name="generic", model=model or "unknown", model_raw=model_raw)
    info.logical_cpus = procs

    raw_vendor_id = ""
    for line in text.splitlines():  # keep the spaces of "  Shanghai  "
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "vendor_id":
            raw_vendor_id = value[1:] if value.startswith(" ") or value.startswith("\t") else value
            break
    vendor_id = g.get("vendor_id", "")
    info.vendor_id = raw_vendor_id
    loongson_text = " ".join(g.get(k, "") for k in ("model name", "cpu model", "system type", "cpu family")).lower()

    if vendor_id:
        info.family = _int(g.get("cpu family"))
        info.model_id = _int(g.get("model"))
        if vendor_id == "GenuineIntel":
            vendor = "intel"
        elif vendor_id == "AuthenticAMD":
            vendor = "amd"
        elif vendor_id == "HygonGenuine":
            vendor = "hygon"
        elif vendor_id == "Shanghai" or vendor_id == "CentaurHauls":
            # CentaurHauls is shared with VIA; a VIA model name keeps it generic.
            vendor = "generic" if "via" in model.lower().split() else "zhaoxin"
        siblings, cores = _int(g.get("siblings")), _int(g.get("cpu cores"))
        if siblings and cores:
            info.threads_per_core = max(1, siblings // cores)
        info.x86_level = x86_level(flags)
    elif "cpu implementer" in g:
        impl = _int(g.get("cpu implementer"), 16)
        part = _int(g.get("cpu part"), 16)
        info.implementer = g.get("cpu implementer", "").lower()
        info.part = g.get("cpu part", "").lower() or None
        if impl == 0x48:
            vendor = "kunpeng"
            if part is not None and part in KUNPENG_PARTS:
                info.core_name = {0xD01: "TSV110", 0xD02: "HIP09", 0xD06: "HIP12"}[part]
                if not model:
                    model = KUNPENG_PARTS[part]
            elif not model:
                model = f"HiSilicon part {info.part}"
        elif impl == 0x70:
            vendor = "phytium"
            core = PHYTIUM_PARTS.get(part) if part is not None else None
            info.core_name = core
            if part is not None:
                info.soc_candidates = _phytium_soc(part, procs)
            if not model:
                if core and len(info.soc_candidates) == 1:
                    model = f"Phytium {core} core (likely {info.soc_candidates[0]})"
                elif core:
                    model = f"Phytium {core} core (SoC not identified: {' / '.join(info.soc_candidates)})"
                else:
                    model = f"Phytium part {info.part}"
        elif impl == 0x41:
            vendor = "arm"
            if not model:
                model = f"ARM part {info.part}"
        elif not model and impl is not None:
            model = f"{ARM_IMPLEMENTERS.get(impl, hex(impl))} part {info.part}"
    elif "loongson" in loongson_text or arch in {"loongarch64", "loongarch32"}:
        vendor = "loongson"
        if not model:
            model = g.get("cpu family") or "Loongson (unknown model)"

    if vendor != "loongson" and "loongson" in loongson_text:
        vendor = "loongson"
    info.vendor = vendor
    info.vendor_name = VENDOR_NAMES.get(vendor, vendor)
    info.model = re.sub(r"\s+", " ", model).strip() or "unknown"
    info.flags = sorted(flags)
    info.features = _features(arch, vendor, flags)
    info.domestic = vendor in DOMESTIC_VENDORS
    return info


_ARCH_FAMILIES: dict[str, str] = {
    "x86_64": "x86", "i686": "x86", "i386": "x86", "aarch64": "arm", "armv7l": "arm", "armv8l": "arm",
    "loongarch64": "loongarch", "loongarch32": "loongarch", "mips64": "mips", "riscv64": "riscv",
}  # fmt: skip


def arch_family(arch: str) -> str:
    return _ARCH_FAMILIES.get(arch, arch)


def identify_cpu_checked(text: str, arch: str) -> tuple[CpuInfo, str | None]:
    """identify_cpu, cross-checked against the architecture the cpuinfo text itself describes.

    Under user-mode emulation (qemu-user through binfmt_misc) an aarch64 userland reads the x86 host's
    /proc/cpuinfo: `uname -m` says aarch64, cpuinfo an Intel Xeon with AVX-512. Presenting that CPU (its
    features, its build flags) as this machine's would be wrong, so the CPU becomes an unknown CPU of
    `arch` and the second value says what was seen; it is None when both agree or cpuinfo says nothing."""
    seen = infer_arch(text)
    if seen is None or arch_family(seen) == arch_family(arch):
        return identify_cpu(text, arch), None
    host = identify_cpu(text, seen)
    cpu = identify_cpu("", arch)
    cpu.model = f"unknown {arch} CPU (cpuinfo shows the {seen} CPU {host.model})"
    cpu.logical_cpus = host.logical_cpus
    note = (
        f"architecture mismatch: uname -m says {arch} but /proc/cpuinfo describes a CPU of another "
        f"architecture ({seen}: {host.model}): this looks like user-mode emulation (e.g. qemu-user through "
        f"binfmt_misc) on a {seen} host. CPU model, features and build flags of the real CPU are unknown, "
        "everything runs several times slower than natively, and native extensions may crash under the emulator"
    )
    return cpu, note
