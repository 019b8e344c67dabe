"""Compiler flags for native wheels built from source, from the platform probe's per-vendor table.

Used by deploy/Dockerfile and scripts/wheelhouse.sh (stdlib only: it runs before xcstack's dependencies
are installed):

    python -m xcstack.supply.buildenv                  # this host's CPU vendor baseline
    python -m xcstack.supply.buildenv --target kunpeng # a named fleet (cross/QEMU builds cannot detect it)
    . <(python -m xcstack.supply.buildenv --target hygon)   # exports CFLAGS, CXXFLAGS, RUSTFLAGS

`--target` names a vendor baseline (xcstack.platform.buildflags): kunpeng, phytium, loongarch64, hygon,
zhaoxin, x86-64 (v2), armv8-a, or `auto` (probe this host). The flags are checked with the C compiler
when one is present; a compiler that rejects them gets the table's fallback flags, or none.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from xcstack.platform.buildflags import BuildFlags, build_flags, check_cflags
from xcstack.platform.cpu import CpuInfo, identify_cpu

# target -> (arch, vendor key, vendor name, model)
TARGETS: dict[str, tuple[str, str, str, str]] = {
    "kunpeng": ("aarch64", "kunpeng", "HiSilicon", "Kunpeng 920 (TSV110)"),
    "phytium": ("aarch64", "phytium", "Phytium", "Phytium FTC66x"),
    "armv8-a": ("aarch64", "arm", "ARM", "generic"),
    "loongarch64": ("loongarch64", "loongson", "Loongson", "Loongson-3A5000"),
    "hygon": ("x86_64", "hygon", "Hygon", "Hygon C86"),
    "zhaoxin": ("x86_64", "zhaoxin", "Zhaoxin", "Zhaoxin KX-6000"),
    "x86-64": ("x86_64", "intel", "Intel", "generic x86-64"),
}
_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
         "loong64": "loongarch64", "loongarch64": "loongarch64"}


def flags_for(target: str, arch: str | None = None) -> BuildFlags:
    """The baseline of a named target, or of this host (`auto`)."""
    if target == "auto":
        host_arch = _ARCH.get((arch or platform.machine()).lower(), platform.machine())
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        return build_flags(identify_cpu(text, host_arch))
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; one of auto, {', '.join(TARGETS)}")
    t_arch, vendor, vendor_name, model = TARGETS[target]
    if arch and _ARCH.get(arch.lower(), arch) != t_arch:
        raise ValueError(f"target {target} is {t_arch}, not {arch}")
    cpu = CpuInfo(arch=t_arch, vendor=vendor, vendor_name=vendor_name, model=model, x86_level=2)
    return build_flags(cpu)


def exports(bf: BuildFlags, check: bool = True) -> tuple[str, list[str]]:
    """(shell export lines, notes)."""
    notes = [f"target {bf.target}: {n}" for n in bf.notes]
    cflags = bf.cflags
    if check:
        result = check_cflags(cflags)
        if result.ok is False:
            notes.append(f"compiler {result.compiler} rejected {cflags!r}: {result.message}")
            cflags = bf.fallback_cflags
            if cflags and check_cflags(cflags).ok is False:
                cflags = ""
            notes.append(f"using {cflags!r} instead" if cflags else "using no tuning flags")
        elif result.ok is None:
            notes.append(result.message)
    lines = [f"# xcstack build flags for {bf.target}"] + [f"# {n}" for n in notes]
    if cflags:
        lines.append(f"export CFLAGS={shlex.quote(cflags)}")
        lines.append(f"export CXXFLAGS={shlex.quote(cflags)}")
    if bf.rustflags and cflags == bf.cflags:
        lines.append(f"export RUSTFLAGS={shlex.quote(bf.rustflags)}")
    return "\n".join(lines) + "\n", notes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xcstack.supply.buildenv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="auto", help="auto or one of: " + ", ".join(TARGETS))
    p.add_argument("--arch", default=None, help="the build's architecture (Docker TARGETARCH), checked against it")
    p.add_argument("--no-check", action="store_true", help="do not try the flags with the C compiler")
    args = p.parse_args(argv)
    try:
        bf = flags_for(args.target, args.arch)
    except ValueError as exc:
        print(f"buildenv: {exc}", file=sys.stderr)
        return 2
    text, _ = exports(bf, check=not args.no_check)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
