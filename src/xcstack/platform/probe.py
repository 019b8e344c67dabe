"""The platform probe: what machine, OS, kernel, limits and Python accelerators xcstack runs on.

`probe(root=Path("/"))` reads every file relative to `root`, so tests (and `xcstack doctor --root`)
can point it at a fixture tree. Probing a tree other than "/" is *not live*: the running process'
own state (sched_getaffinity, RLIMIT_NOFILE, uname, the io_uring syscall, installed Python packages)
is not mixed in, because it says nothing about the tree.

Everything here is stdlib; no heavy module is imported (onnxruntime's execution providers are asked
for in a child interpreter with a timeout, so a broken or slow build cannot hurt the caller).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcstack.platform.cpu import CpuInfo, identify_cpu_checked, infer_arch
from xcstack.platform.cpulist import parse_cpulist
from xcstack.platform.iouring import IoUringInfo, normalize_machine, probe_io_uring
from xcstack.platform.native import MORE_NATIVE, ImportCheck, check_imports, fix_for
from xcstack.platform.osinfo import OsInfo, identify_os

__all__ = [
    "CpuInfo",
    "CpuResources",
    "IoUringInfo",
    "Limits",
    "MemoryInfo",
    "OsInfo",
    "PlatformReport",
    "PythonInfo",
    "PythonPackage",
    "probe",
    "probe_python",
]

SYSCTLS = (
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_fin_timeout",
    "fs.file-max",
    "fs.nr_open",
    "fs.epoll.max_user_watches",
    "kernel.io_uring_disabled",
    "kernel.io_uring_group",
)

# (distribution, import name, what it accelerates)
ACCELERATORS: tuple[tuple[str, str, str], ...] = (
    ("uvloop", "uvloop", "event loop (libuv)"),
    ("orjson", "orjson", "JSON encode/decode"),
    ("granian", "granian", "HTTP server (Rust)"),
    ("httptools", "httptools", "HTTP parser for uvicorn"),
    ("onnxruntime", "onnxruntime", "model inference"),
    ("onnxruntime-gpu", "onnxruntime", "model inference (CUDA build)"),
    ("tokenizers", "tokenizers", "fast tokenizers (Rust)"),
    ("numpy", "numpy", "tensors"),
    ("cryptography", "cryptography", "SM3/SM4 (OpenSSL)"),
    # SM2 runs on the system OpenSSL 3 libcrypto when it has SM2 (no package); these are the fallbacks.
    # Which one runs: xcstack.crypto.primitives.sm2.sm2_backend_info().
    ("gmssl-pyx", "gmssl_pyx", "SM2 fallback (bundled GmSSL; x86_64 wheels only)"),
    ("gmalglib", "gmalglib", "SM2 fallback (portable C, built from its sdist; not constant-time)"),
    ("msgpack", "msgpack", "IPC meta encoding (C extension)"),
)


@dataclass
class CpuResources:
    """Which CPUs this process may really use: online ∩ affinity ∩ cgroup cpuset, and the CFS quota."""

    online: list[int] = field(default_factory=list)
    affinity: list[int] | None = None  # os.sched_getaffinity (live probes only)
    cgroup_version: int | None = None  # 1 | 2 | None
    cgroup_path: str = "/"
    cpuset: list[int] | None = None  # cgroup cpuset effective cpus
    quota_cores: float | None = None  # cpu.max quota / period (None: unlimited)
    cpu_max: str | None = None  # raw "150000 100000" / "max 100000" / v1 "quota period"
    usable: list[int] = field(default_factory=list)
    budget: float = 0.0  # min(len(usable), quota_cores)
    numa_nodes: dict[str, list[int]] = field(default_factory=dict)
    threads_per_core: int | None = None
    smt_siblings: list[list[int]] = field(default_factory=list)  # usable CPUs sharing a physical core


@dataclass
class MemoryInfo:
    total_bytes: int | None = None
    available_bytes: int | None = None
    cgroup_limit_bytes: int | None = None  # None: unlimited

    @property
    def effective_bytes(self) -> int | None:
        vals = [v for v in (self.total_bytes, self.cgroup_limit_bytes) if v]
        return min(vals) if vals else None


@dataclass
class Limits:
    somaxconn: int | None = None
    tcp_max_syn_backlog: int | None = None
    epoll_max_user_watches: int | None = None
    file_max: int | None = None
    nr_open: int | None = None
    ip_local_port_range: list[int] | None = None
    nofile_soft: int | None = None  # RLIMIT_NOFILE (None: unknown; -1: unlimited)
    nofile_hard: int | None = None
    sysctls: dict[str, str | None] = field(default_factory=dict)


# Imports the tuning plan depends on (event loop, JSON, model workers): tried even when not all are.
PLAN_IMPORTS = ("uvloop", "orjson", "onnxruntime")


@dataclass
class PythonPackage:
    name: str
    module: str
    purpose: str
    present: bool  # installed (found on sys.path)
    version: str | None = None
    # ok | missing | error | crash | hang (tried in a child interpreter) | unchecked (found, not tried)
    status: str = "unchecked"
    detail: str = ""  # why it is not ok ("import onnxruntime killed the interpreter with SIGSEGV ...")
    fix: str = ""  # what to install or build when it is not ok

    @property
    def works(self) -> bool:
        return self.present and self.status in ("ok", "unchecked")


@dataclass
class PythonInfo:
    probed: bool
    version: str = ""
    implementation: str = ""
    executable: str = ""
    packages: list[PythonPackage] = field(default_factory=list)
    onnxruntime_providers: list[str] = field(default_factory=list)
    onnxruntime_error: str | None = None

    def has(self, module: str) -> bool:
        """Installed and, where it was tried, imports."""
        return any(p.works and p.module == module for p in self.packages)

    def package(self, module: str) -> PythonPackage | None:
        return next((p for p in self.packages if p.module == module), None)

    def problems(self) -> list[PythonPackage]:
        """Packages that are missing or do not import."""
        return [p for p in self.packages if not p.works]


@dataclass
class PlatformReport:
    root: str
    live: bool
    arch: str
    hostname: str
    machine_model: str  # DMI product / device-tree model, "" when unknown
    cpu: CpuInfo
    cpus: CpuResources
    memory: MemoryInfo
    os: OsInfo
    io_uring: IoUringInfo
    limits: Limits
    python: PythonInfo
    errors: list[str] = field(default_factory=list)  # files that could not be read (best effort)
    # uname -m and /proc/cpuinfo disagree (e.g. qemu-user: an aarch64 userland shown the host's x86 CPU)
    emulation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, sort_keys=False)


class _Reader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.errors: list[str] = []

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str, *, note: bool = False) -> str | None:
        p = self.path(rel)
        try:
            return p.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            if note:
                self.errors.append(f"{rel}: {exc.strerror or exc}")
            return None

    def read1(self, rel: str) -> str | None:
        t = self.read(rel)
        return t.strip() if t is not None else None

    def int1(self, rel: str) -> int | None:
        t = self.read1(rel)
        if t is None:
            return None
        try:
            return int(t.split()[0])
        except (ValueError, IndexError):
            return None


def _proc_self_cgroup(r: _Reader) -> dict[str, str]:
    """controller -> path ('' key for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    text = r.read("proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:
            out[""] = path
        for c in ctrls.split(","):
            if c:
                out[c.removeprefix("name=")] = path
    return out


def _ancestors(base: str, path: str) -> list[str]:
    """`base/a/b`, `base/a`, `base` (leaf first)."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [base + "".join("/" + p for p in parts[:i]) for i in range(len(parts), -1, -1)]


def _cgroup_cpus(r: _Reader, res: CpuResources) -> None:
    cg = _proc_self_cgroup(r)
    if r.path("sys/fs/cgroup/cgroup.controllers").exists():
        res.cgroup_version = 2
        path = cg.get("", "/")
        res.cgroup_path = path
        dirs = _ancestors("sys/fs/cgroup", path)
        if not r.path(dirs[0]).is_dir():  # namespaced view: our cgroup is the mount root
            dirs = ["sys/fs/cgroup"]
        quota: float | None = None
        for d in dirs:
            raw = r.read1(f"{d}/cpu.max")
            if raw is None:
                continue
            fields = raw.split()
            if len(fields) >= 1 and fields[0] != "max":
                try:
                    q = int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000)
                except (ValueError, ZeroDivisionError):
                    continue
                if quota is None or q < quota:
                    quota = q
                    res.cpu_max = raw
            elif res.cpu_max is None:
                res.cpu_max = raw
        res.quota_cores = quota
        for d in dirs:
            cs = parse_cpulist(r.read1(f"{d}/cpuset.cpus.effective"))
            if cs:
                res.cpuset = cs
                break
        return
    # cgroup v1 (or hybrid): per-controller hierarchies
    has_v1 = any(r.path(f"sys/fs/cgroup/{d}").is_dir() for d in ("cpu", "cpu,cpuacct", "cpuset"))
    if not has_v1:
        return
    res.cgroup_version = 1
    cpu_path = cg.get("cpu", "/")
    res.cgroup_path = cpu_path
    for mount in ("sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu", "sys/fs/cgroup/cpuacct,cpu"):
        if not r.path(mount).is_dir():
            continue
        dirs = _ancestors(mount, cpu_path)
        if not r.path(dirs[0]).is_dir():
            dirs = [mount]
        quota = None
        for d in dirs:
            q_us, p_us = r.int1(f"{d}/cpu.cfs_quota_us"), r.int1(f"{d}/cpu.cfs_period_us")
            if q_us is not None and q_us > 0 and p_us:
                q = q_us / p_us
                if quota is None or q < quota:
                    quota = q
                    res.cpu_max = f"{q_us} {p_us}"
        res.quota_cores = quota
        break
    mount = "sys/fs/cgroup/cpuset"
    if r.path(mount).is_dir():
        dirs = _ancestors(mount, cg.get("cpuset", "/"))
        if not r.path(dirs[0]).is_dir():
            dirs = [mount]
        for d in dirs:
            cs = parse_cpulist(r.read1(f"{d}/cpuset.effective_cpus")) or parse_cpulist(r.read1(f"{d}/cpuset.cpus"))
            if cs:
                res.cpuset = cs
                break


def _cpu_resources(r: _Reader, cpu: CpuInfo, live: bool) -> CpuResources:
    res = CpuResources()
    online = parse_cpulist(r.read1("sys/devices/system/cpu/online"))
    if online is None:
        online = list(range(cpu.logical_cpus)) if cpu.logical_cpus else []
    if not online and live:
        online = list(range(os.cpu_count() or 1))
    res.online = online
    if live and hasattr(os, "sched_getaffinity"):
        try:
            res.affinity = sorted(os.sched_getaffinity(0))
        except OSError:
            res.affinity = None
    _cgroup_cpus(r, res)
    usable = set(online) if online else set()
    for s in (res.affinity, res.cpuset):
        if s is not None:
            usable = usable & set(s) if usable else set(s)
    if not usable:
        usable = {0}
    res.usable = sorted(usable)
    res.budget = float(len(res.usable))
    if res.quota_cores is not None:
        res.budget = min(res.budget, res.quota_cores)
    node_dir = r.path("sys/devices/system/node")
    if node_dir.is_dir():
        for entry in sorted(node_dir.glob("node[0-9]*")):
            cl = parse_cpulist(r.read1(f"sys/devices/system/node/{entry.name}/cpulist"))
            if cl:
                res.numa_nodes[entry.name.removeprefix("node")] = cl
    res.threads_per_core = cpu.threads_per_core
    usable_set = set(res.usable)
    seen: set[int] = set()
    for c in res.usable[:4096]:
        if c in seen:
            continue
        sib = parse_cpulist(r.read1(f"sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"))
        if not sib:
            continue
        if c == res.usable[0]:
            res.threads_per_core = len(sib)
        group = [x for x in sib if x in usable_set]
        seen.update(group)
        if len(group) > 1:
            res.smt_siblings.append(group)
    return res


def _meminfo(r: _Reader, cgroup_version: int | None, cg_path: str) -> MemoryInfo:
    m = MemoryInfo()
    for line in (r.read("proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        vals = rest.split()
        if not vals or not vals[0].isdigit():
            continue
        kb = int(vals[0]) * 1024
        if key == "MemTotal":
            m.total_bytes = kb
        elif key == "MemAvailable":
            m.available_bytes = kb
    cg = _proc_self_cgroup(r)
    if cgroup_version == 2:
        path = cg.get("", "/")
        dirs = _ancestors("sys/fs/cgroup", path)
        if not r.path(dirs[0]).is_dir():
            dirs = ["sys/fs/cgroup"]
        for d in dirs:
            raw = r.read1(f"{d}/memory.max")
            if raw and raw != "max" and raw.isdigit():
                v = int(raw)
                m.cgroup_limit_bytes = v if m.cgroup_limit_bytes is None else min(v, m.cgroup_limit_bytes)
    elif cgroup_version == 1:
        base = "sys/fs/cgroup/memory"
        dirs = _ancestors(base, cg.get("memory", "/"))
        if not r.path(dirs[0]).is_dir():
            dirs = [base]
        for d in dirs:
            v1 = r.int1(f"{d}/memory.limit_in_bytes")
            if v1 is not None and 0 < v1 < (1 << 60):
                m.cgroup_limit_bytes = v1 if m.cgroup_limit_bytes is None else min(v1, m.cgroup_limit_bytes)
    return m


def _limits(r: _Reader, live: bool) -> Limits:
    lim = Limits()
    for key in SYSCTLS:
        raw = r.read1("proc/sys/" + key.replace(".", "/"))
        lim.sysctls[key] = " ".join(raw.split()) if raw is not None else None

    def num(key: str) -> int | None:
        v = lim.sysctls.get(key)
        try:
            return int(v.split()[0]) if v else None
        except ValueError:
            return None

    lim.somaxconn = num("net.core.somaxconn")
    lim.tcp_max_syn_backlog = num("net.ipv4.tcp_max_syn_backlog")
    lim.epoll_max_user_watches = num("fs.epoll.max_user_watches")
    lim.file_max = num("fs.file-max")
    lim.nr_open = num("fs.nr_open")
    pr = lim.sysctls.get("net.ipv4.ip_local_port_range")
    if pr:
        try:
            lo, hi = (int(x) for x in pr.split()[:2])
            lim.ip_local_port_range = [lo, hi]
        except ValueError:
            pass
    if live:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lim.nofile_soft = -1 if soft == resource.RLIM_INFINITY else soft
            lim.nofile_hard = -1 if hard == resource.RLIM_INFINITY else hard
        except (ImportError, OSError, ValueError):
            pass
    else:
        for line in (r.read("proc/self/limits") or "").splitlines():
            if line.startswith("Max open files"):
                vals = line[len("Max open files") :].split()
                if len(vals) >= 2:
                    lim.nofile_soft = -1 if vals[0] == "unlimited" else _toint(vals[0])
                    lim.nofile_hard = -1 if vals[1] == "unlimited" else _toint(vals[1])
    return lim


def _toint(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def probe_python(*, onnxruntime_providers: bool = True, timeout: float = 30.0, imports: str = "plan") -> PythonInfo:
    """Which optional accelerators this interpreter has, and whether they import.

    Presence comes from find_spec and metadata (nothing is imported here). Imports are tried in a
    child interpreter each, so a crash (e.g. SIGSEGV under qemu-user) or a hang is reported instead
    of taking this process down: `imports` "all" tries every installed package (doctor), "plan" the
    ones the tuning plan depends on (PLAN_IMPORTS), "none" none. onnxruntime's execution providers
    come from its child; `onnxruntime_providers=False` leaves onnxruntime untried."""
    info = PythonInfo(
        probed=True,
        version=platform.python_version(),
        implementation=platform.python_implementation(),
        executable=sys.executable,
    )
    known = {d for d, _, _ in ACCELERATORS}
    listed = ACCELERATORS + tuple(x for x in MORE_NATIVE if x[0] not in known)
    for dist, module, purpose in listed:
        version: str | None
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if dist == "onnxruntime-gpu" and version is None:
            continue
        try:
            spec_ok = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            spec_ok = False
        pkg = PythonPackage(dist, module, purpose, spec_ok, version)
        if not spec_ok:
            pkg.status, pkg.detail, pkg.fix = "missing", f"{module} is not installed", fix_for(dist)
        info.packages.append(pkg)
    wanted = {"all": None, "plan": set(PLAN_IMPORTS), "none": set()}[imports]
    to_try = [p.module for p in info.packages
              if p.present and (wanted is None or p.module in wanted)
              and (onnxruntime_providers or p.module != "onnxruntime")]  # fmt: skip
    results = check_imports(to_try, timeout=timeout)
    for pkg in info.packages:
        res = results.get(pkg.module)
        if res is not None:
            _apply(pkg, res)
    ort = results.get("onnxruntime")
    if ort is not None and ort.ok:
        info.onnxruntime_providers = [str(x) for x in ort.info.get("providers", [])]
    elif ort is not None:
        info.onnxruntime_error = ort.detail
    return info


def _apply(pkg: PythonPackage, res: ImportCheck) -> None:
    pkg.status = res.status
    if res.status == "missing":  # found by find_spec, yet the import says it is not there
        pkg.present = False
    if not res.ok:
        pkg.detail = res.detail
        pkg.fix = fix_for(pkg.name)


def _machine_model(r: _Reader) -> str:
    for rel in ("sys/devices/virtual/dmi/id/product_name", "sys/class/dmi/id/product_name",
                "sys/firmware/devicetree/base/model", "proc/device-tree/model"):  # fmt: skip
        v = r.read1(rel)
        if v:
            v = v.replace("\x00", "").strip()
            if v and v.lower() not in {"to be filled by o.e.m.", "default string", "none"}:
                return v
    return ""


def probe(
    root: Path | str = Path("/"),
    *,
    machine: str | None = None,
    live: bool | None = None,
    python: bool | None = None,
    onnxruntime_providers: bool = True,
    imports: str = "plan",
) -> PlatformReport:
    """Probe the platform.

    root: the file tree to read (/proc, /sys, /etc under it).
    machine: architecture override; default `platform.machine()` when live, else inferred from the
        tree's cpuinfo.
    live: whether `root` is this running machine (default: root is "/"). Only a live probe makes
        the io_uring syscall and reads this process' affinity, rlimits and uname.
    python: probe this interpreter's accelerators (default: live).
    imports: which of them to import in a child interpreter: "all" (doctor), "plan" (what the tuning
        plan depends on), "none" (see probe_python).

    `uname -m` (or `machine`) is checked against the architecture /proc/cpuinfo describes: when they
    differ (user-mode emulation), the CPU is reported as an unknown CPU of the machine's architecture
    and `emulation` says why, instead of presenting the emulator host's CPU as this machine's.
    """
    root_p = Path(root)
    is_live = live if live is not None else root_p.resolve() == Path("/")
    r = _Reader(root_p)
    cpuinfo = r.read("proc/cpuinfo", note=True) or ""
    if machine:
        arch = normalize_machine(machine)
    elif is_live:
        arch = normalize_machine(platform.machine())
    else:
        arch = infer_arch(cpuinfo) or normalize_machine(platform.machine())
    cpu, emulation = identify_cpu_checked(cpuinfo, arch)

    kernel = r.read1("proc/sys/kernel/osrelease") or ""
    if not kernel and is_live:
        kernel = platform.release()
    extra: dict[str, str] = {}
    for name in ("kylin-release", "openEuler-release", "UnionTech-release"):
        t = r.read(f"etc/{name}")
        if t is not None:
            extra[name] = t
    os_info = identify_os(r.read("etc/os-release") or r.read("usr/lib/os-release"), r.read("etc/lsb-release"),
                          extra, kernel)  # fmt: skip

    cpus = _cpu_resources(r, cpu, is_live)
    memory = _meminfo(r, cpus.cgroup_version, cpus.cgroup_path)
    limits = _limits(r, is_live)

    seccomp: int | None = None
    for line in (r.read("proc/self/status") or "").splitlines():
        if line.startswith("Seccomp:"):
            seccomp = _toint(line.split(":", 1)[1].strip())
            break

    def _sys_int(key: str) -> int | None:
        v = limits.sysctls.get(key)
        return _toint(v) if v is not None else None

    io = probe_io_uring(
        live=is_live,
        arch=arch,
        kernel_version=os_info.kernel_version,
        disabled_sysctl=_sys_int("kernel.io_uring_disabled"),
        io_uring_group=_sys_int("kernel.io_uring_group"),
        seccomp=seccomp,
    )
    do_python = python if python is not None else is_live
    py = probe_python(onnxruntime_providers=onnxruntime_providers, imports=imports) if do_python \
        else PythonInfo(probed=False)
    hostname = (r.read1("proc/sys/kernel/hostname") or r.read1("etc/hostname") or "") if not is_live else ""
    if is_live:
        hostname = platform.node()
    return PlatformReport(
        root=str(root_p),
        live=is_live,
        arch=arch,
        hostname=hostname,
        machine_model=_machine_model(r),
        cpu=cpu,
        cpus=cpus,
        memory=memory,
        os=os_info,
        io_uring=io,
        limits=limits,
        python=py,
        errors=r.errors,
        emulation=emulation,
    )


def cpu_slots(budget: float, usable: int) -> int:
    """Whole cores worth planning for: the quota rounded half up, at least 1, at most the usable cores.

    A 1.5-core quota over a 2-core cpuset plans 2 slots (throttling is reported as a warning)."""
    return max(1, min(usable, math.floor(budget + 0.5)))
