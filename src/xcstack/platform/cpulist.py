"""Linux CPU list syntax (`0-3,8,10-11`), as used by sysfs, cgroups and `taskset -c`."""

from __future__ import annotations

from collections.abc import Iterable


def parse_cpulist(text: str | None) -> list[int] | None:
    """Parse `0-3,8,10-11` into a sorted list; None for missing/blank/garbled input.

    Stride syntax (`0-7:2`, accepted by cgroup v1 cpuset) is honoured."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            stride = 1
            if ":" in part:
                part, s = part.split(":", 1)
                stride = int(s)
                if stride < 1:
                    return None
            if "-" in part:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
                if lo < 0 or hi < lo:
                    return None
                cpus.update(range(lo, hi + 1, stride))
            else:
                n = int(part)
                if n < 0:
                    return None
                cpus.add(n)
    except ValueError:
        return None
    return sorted(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Inverse of parse_cpulist: `[0,1,2,3,8]` -> `0-3,8`."""
    ordered = sorted(set(cpus))
    if not ordered:
        return ""
    runs: list[str] = []
    start = prev = ordered[0]
    for c in ordered[1:]:
        if c == prev + 1:
            prev = c
            continue
        runs.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = c
    runs.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(runs)
