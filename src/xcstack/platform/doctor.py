"""`xcstack doctor`: the probe, the tuning plan, build flags and warnings as a table or JSON.

Doctor tests rather than trusts: every native package is imported in a child interpreter (a crash or
a hang is reported as such, with the signal), and `uname -m` is checked against /proc/cpuinfo. Each
package that is missing or broken is listed with the reason and the fix (`problems`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcstack.platform.buildflags import FlagCheck, check_cflags
from xcstack.platform.cpulist import format_cpulist
from xcstack.platform.plan import TuningPlan, derive_plan
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.probe import PlatformReport, PythonPackage, probe
from xcstack.platform.sysctl import SysctlAdvice, sysctl_advice


@dataclass
class DoctorResult:
    report: PlatformReport
    plan: TuningPlan
    flag_checks: list[FlagCheck] = field(default_factory=list)
    sysctl: list[SysctlAdvice] = field(default_factory=list)
    sm2: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)  # the llama.cpp build's backends (CPU, CUDA, CANN)

    def problems(self) -> list[dict[str, str]]:
        """Native packages that are missing or do not import: what, why, and the fix."""
        return [{"package": p.name, "module": p.module, "purpose": p.purpose, "status": p.status,
                 "reason": p.detail, "fix": p.fix} for p in self.report.python.problems()]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": self.problems(),
            "report": self.report.to_dict(),
            "plan": self.plan.to_dict(),
            "flag_checks": [dataclasses.asdict(c) for c in self.flag_checks],
            "sysctl": [dataclasses.asdict(a) for a in self.sysctl],
            "sm2": self.sm2,
            "llm": self.llm,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def collect(
    root: Path | str = Path("/"),
    overrides: PlanOverrides | None = None,
    *,
    machine: str | None = None,
    check_flags: bool = True,
) -> DoctorResult:
    report = probe(root, machine=machine, imports="all")
    plan = derive_plan(report, overrides)
    checks: list[FlagCheck] = []
    # Compiler flags can only be checked by a compiler for this very machine.
    if check_flags and report.live:
        for flags in dict.fromkeys([plan.build.cflags, plan.build.host_cflags]):
            checks.append(check_cflags(flags))
    from xcstack.llm.backends import llm_backends

    return DoctorResult(report, plan, checks, sysctl_advice(report), sm2_backend() if report.live else {},
                        llm_backends() if report.live else {})


_SM2_CHILD = "import json; from xcstack.crypto.primitives.sm2 import sm2_backend_info as i; print(json.dumps(i()))"


def sm2_backend() -> dict[str, Any]:
    """The SM2 backend xcstack would use here, asked in a child process (a backend whose native code
    crashes takes the child down, not doctor): name, version, whether it is constant-time, and why the
    backends tried before it did not load."""
    try:
        done = subprocess.run([sys.executable, "-c", _SM2_CHILD], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return {"name": None, "error": "loading the SM2 backend hung for 30 s"}
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else done.stderr.strip().splitlines()[-1:]
        return {"name": None, "error": f"loading the SM2 backend failed: {why}"}
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.1f} GiB"


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _cpus(groups: list[list[int]]) -> str:
    if not groups:
        return "-"
    if all(not g for g in groups):
        return "unpinned"
    return " ".join(format_cpulist(g) or "-" for g in groups)


def _package_state(pkg: PythonPackage) -> str:
    what = f"({pkg.purpose})"
    if pkg.status == "ok":
        return f"{pkg.version or 'present'} {what}, imports"
    if pkg.status == "unchecked":
        return f"{pkg.version or 'present'} {what}, import not tried"
    label = {"missing": "MISSING", "crash": "CRASHES on import", "hang": "HANGS on import"}.get(pkg.status, "BROKEN")
    return f"{label} {what}"


def render_text(res: DoctorResult) -> str:
    r, p = res.report, res.plan
    rows: list[tuple[str, str, str]] = []  # (section, key, value)

    def add(section: str, key: str, value: object) -> None:
        rows.append((section, key, "-" if value is None or value == "" else str(value)))

    cpu = r.cpu
    src = "this machine" if r.live else f"file tree {r.root}"
    add("platform", "probed", src)
    add("platform", "architecture", r.arch)
    add("platform", "cpu vendor", f"{cpu.vendor_name}" + (" (信创)" if cpu.domestic else ""))
    add("platform", "cpu model", cpu.model)
    if cpu.implementer:
        add("platform", "cpu id", f"implementer {cpu.implementer} part {cpu.part} ({cpu.core_name or '?'})")
    if cpu.soc_candidates:
        add("platform", "soc", " / ".join(cpu.soc_candidates))
    if r.machine_model:
        add("platform", "machine", r.machine_model)
    if r.emulation:
        add("platform", "cpu check", f"uname -m and /proc/cpuinfo DISAGREE: emulated {r.arch} (see warnings)")
    feats = [k for k, v in cpu.features.items() if v]
    add("platform", "cpu features", " ".join(feats))
    if cpu.x86_level:
        add("platform", "x86-64 level", f"v{cpu.x86_level}")
    c = r.cpus
    add("platform", "cpus online", f"{len(c.online)} ({format_cpulist(c.online)})")
    add("platform", "cpus usable", f"{len(c.usable)} ({format_cpulist(c.usable)})")
    cg = f"v{c.cgroup_version}" if c.cgroup_version else "none"
    quota = f"{c.quota_cores:g} cores" if c.quota_cores is not None else "unlimited"
    cpuset = format_cpulist(c.cpuset) if c.cpuset is not None else "-"
    add("platform", "cgroup", f"{cg} path {c.cgroup_path}; cpu quota {quota}; cpuset {cpuset}")
    if len(c.numa_nodes) > 1:
        add("platform", "numa", "; ".join(f"node{k}: {format_cpulist(v)}" for k, v in c.numa_nodes.items()))
    add("platform", "memory", f"{_fmt_bytes(r.memory.total_bytes)} total; cgroup limit "
        f"{_fmt_bytes(r.memory.cgroup_limit_bytes) if r.memory.cgroup_limit_bytes else 'none'}")  # fmt: skip
    o = r.os
    add("platform", "os", f"{o.name} {o.version_id}".strip() + (" (信创)" if o.domestic else ""))
    if o.pretty_name:
        add("platform", "os release", o.pretty_name)
    if o.source != "os-release":
        add("platform", "os detected from", f"{o.source} (os-release ID={o.os_release_id})")
    add("platform", "kernel", o.kernel)
    io = r.io_uring
    add("platform", "io_uring", f"{io.status}: {io.reason}")
    add("platform", "seccomp", f"{io.seccomp_mode}")

    lim = r.limits
    add("limits", "net.core.somaxconn", lim.somaxconn)
    add("limits", "tcp_max_syn_backlog", lim.tcp_max_syn_backlog)
    add("limits", "fs.epoll.max_user_watches", lim.epoll_max_user_watches)
    add("limits", "fs.file-max", lim.file_max)
    nofile = "-" if lim.nofile_soft is None else f"{lim.nofile_soft} soft / {lim.nofile_hard} hard"
    add("limits", "open files (ulimit -n)", nofile.replace("-1", "unlimited"))
    if lim.ip_local_port_range:
        add("limits", "ip_local_port_range", f"{lim.ip_local_port_range[0]}-{lim.ip_local_port_range[1]}")

    py = r.python
    if py.probed:
        add("python", "interpreter", f"{py.implementation} {py.version} ({py.executable})")
        for pkg in py.packages:
            add("python", pkg.name, _package_state(pkg))
        if py.onnxruntime_providers:
            add("python", "onnxruntime providers", ", ".join(py.onnxruntime_providers))
    else:
        add("python", "accelerators", "not probed (not this machine)")

    add("plan", "cpu slots", f"{p.cpu_slots} (budget {p.cpu_budget:g} cores)")
    add("plan", "http workers", f"{p.http_workers} on cpus {_cpus(p.http_cpus)}")
    add("plan", "model workers", f"{p.model_workers} on cpus {_cpus(p.model_cpus)}")
    if p.llm_threads:  # only when an llm worker runs ([llm] enabled and its model there)
        add("plan", "llm worker", f"{p.llm_threads} thread(s) on cpus {format_cpulist(p.llm_cpus) or 'any (unpinned)'}")
    add("plan", "i/o vs compute cores",
        f"{format_cpulist(p.io_cores) or '-'} | {format_cpulist(p.compute_cores) or '-'}"
        + (" (shared)" if p.shared_cores else " (disjoint)"))  # fmt: skip
    add("plan", "pinning", "on" if p.pin else "off")
    add("plan", "event loop", p.event_loop)
    add("plan", "json", p.json_library)
    add(
        "plan",
        "onnxruntime",
        f"intra_op={p.onnxruntime['intra_op_num_threads']} "
        f"inter_op={p.onnxruntime['inter_op_num_threads']} spinning off; {', '.join(p.onnxruntime['providers'])}",
    )
    if p.overridden:
        add("plan", "from config", ", ".join(p.overridden))

    b = p.build
    add("build", "target", b.target)
    add("build", "CFLAGS (vendor)", b.cflags)
    add("build", "CFLAGS (this host)", b.host_cflags)
    if b.fallback_cflags:
        add("build", f"CFLAGS (gcc < {b.min_gcc})", b.fallback_cflags)
    if b.rustflags:
        add("build", "RUSTFLAGS", b.rustflags)
    for chk in res.flag_checks:
        state = {True: "accepted", False: "REJECTED", None: "not checked"}[chk.ok]
        add("build", f"check {chk.compiler or 'cc'}", f"{chk.flags}: {state}" + ("" if chk.ok else f" ({chk.message})"))
    for n in b.notes:
        add("build", "note", n)

    bad = [a for a in res.sysctl if not a.ok]
    if bad:
        add("sysctl", "to raise", ", ".join(f"{a.key} {a.current} -> {a.recommended}" for a in bad))
        add("sysctl", "file", "xcstack doctor --sysctl > /etc/sysctl.d/90-xcstack.conf")
    else:
        add("sysctl", "status", "all recommended values met")

    width = max(len(k) for _, k, _ in rows) + 2
    out: list[str] = []
    section = ""
    for sec, key, value in rows:
        if sec != section:
            out.append("" if section else "xcstack doctor")
            out.append(f"[{sec}]")
            section = sec
        out.append(f"  {key:<{width}}{value}")
    if p.notes:
        out.append("")
        out.append("[notes]")
        out += [f"  - {n}" for n in p.notes]
    if res.sm2:
        sm2 = res.sm2
        out.append("")
        out.append("[sm2]")
        if sm2.get("name"):
            ct = {True: "constant-time", False: "NOT constant-time", None: "?"}[sm2.get("constant_time")]
            out.append(f"  backend {sm2['name']} {sm2.get('version') or ''} ({ct})")
        else:
            out.append(f"  NO SM2 BACKEND: {sm2.get('error') or sm2.get('unavailable')}")
        for name, why in (sm2.get("unavailable") or {}).items():
            out.append(f"  {name}: not used ({why})")
    if res.llm:
        from xcstack.llm.backends import render

        out += ["", *render(res.llm)]
    fixes = res.problems()
    if fixes:
        out.append("")
        out.append("[packages to fix]")
        out += [f"  - {f['package']} ({f['purpose']}): {f['reason']}\n    fix: {f['fix']}" for f in fixes]
    if p.warnings or r.errors:
        out.append("")
        out.append("[warnings]")
        out += [f"  ! {w}" for w in p.warnings]
        out += [f"  ! unreadable: {e}" for e in r.errors]
    return "\n".join(out) + "\n"
