"""Is io_uring usable by this process? Probed for real with the io_uring_setup syscall.

`io_uring_setup(1, &params)` (syscall 425 on x86_64, aarch64, loongarch64, riscv64, ...) with a zeroed
120-byte `struct io_uring_params`; a file descriptor back means available (it is closed at once).
The outcome is read together with `kernel.io_uring_disabled` (Linux >= 6.6: 0 allowed, 1 only members
of `kernel.io_uring_group` and CAP_SYS_ADMIN, 2 nobody) and the seccomp mode from /proc/self/status,
because container runtimes commonly block io_uring with a seccomp filter (EPERM or ENOSYS).

When a seccomp filter is active the syscall is made in a child interpreter: a filter may kill the
caller (SECCOMP_RET_KILL / SIGSYS) instead of returning an error.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field

# Generic syscall table number, shared by almost every architecture since Linux 5.1.
IO_URING_SETUP_NR: dict[str, int] = {
    "x86_64": 425, "i386": 425, "i686": 425, "aarch64": 425, "arm64": 425, "armv7l": 425, "armv8l": 425,
    "loongarch64": 425, "riscv64": 425, "ppc64le": 425, "ppc64": 425, "s390x": 425,
    "mips64": 5425,  # n64 ABI
    "alpha": 535,
}  # fmt: skip
PARAMS_SIZE = 120

STATUSES = ("available", "disabled", "blocked", "unsupported", "not_probed")

_FEATURES = [
    "SINGLE_MMAP", "NODROP", "SUBMIT_STABLE", "RW_CUR_POS", "CUR_PERSONALITY", "FAST_POLL", "POLL_32BITS",
    "SQPOLL_NONFIXED", "EXT_ARG", "NATIVE_WORKERS", "RSRC_TAGS", "CQE_SKIP", "LINKED_FILE", "REG_REG_RING",
    "RECVSEND_BUNDLE", "MIN_TIMEOUT", "RW_ATTR", "NO_IOWAIT",
]  # fmt: skip

SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}


@dataclass
class IoUringInfo:
    status: str  # one of STATUSES
    reason: str
    probed: bool = False  # the syscall was really made
    errno: str | None = None  # "EPERM", "ENOSYS", ...
    disabled_sysctl: int | None = None  # kernel.io_uring_disabled (None: kernel < 6.6 or unreadable)
    io_uring_group: int | None = None
    seccomp: int | None = None  # 0 disabled, 1 strict, 2 filter
    seccomp_mode: str = "unknown"
    features: list[str] = field(default_factory=list)
    features_raw: int | None = None
    via_subprocess: bool = False


def feature_names(bits: int) -> list[str]:
    names = [n for i, n in enumerate(_FEATURES) if bits & (1 << i)]
    rest = bits & ~((1 << len(_FEATURES)) - 1)
    if rest:
        names.append(f"0x{rest:x}")
    return names


def _syscall_in_process(nr: int) -> tuple[int, int, int | None]:
    """(fd or -1, errno, features) from io_uring_setup(1, params)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    params = ctypes.create_string_buffer(PARAMS_SIZE)
    ctypes.set_errno(0)
    fd = int(fn(ctypes.c_long(nr), ctypes.c_long(1), params))
    err = ctypes.get_errno()
    feats: int | None = None
    if fd >= 0:
        feats = struct.unpack_from("=6I", params.raw)[5]
        os.close(fd)
    return fd, err, feats


_CHILD = """
import ctypes, json, os, struct, sys
nr = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
p = ctypes.create_string_buffer(120)
fd = int(libc.syscall(ctypes.c_long(nr), ctypes.c_long(1), p))
err = ctypes.get_errno()
feats = None
if fd >= 0:
    feats = struct.unpack_from("=6I", p.raw)[5]
    os.close(fd)
print(json.dumps([fd, err, feats]))
"""


def _syscall_in_child(nr: int, timeout: float = 10.0) -> tuple[int, int, int | None] | str:
    """As _syscall_in_process, in a child interpreter; a str is why the child gave no answer."""
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD, str(nr)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"probe child failed: {exc}"
    if proc.returncode < 0:
        sig = -proc.returncode
        try:
            signame = signal.Signals(sig).name
        except ValueError:
            signame = str(sig)
        return f"probe child killed by {signame}"
    try:
        fd, err, feats = json.loads(proc.stdout.strip().splitlines()[-1])
        return int(fd), int(err), (None if feats is None else int(feats))
    except (ValueError, IndexError, TypeError):
        return f"probe child gave no answer (rc={proc.returncode}): {proc.stderr.strip()[-200:]}"


def _disabled_reason(disabled: int | None, group: int | None) -> str | None:
    if disabled == 2:
        return "kernel.io_uring_disabled=2: io_uring is disabled for every process"
    if disabled == 1:
        g = f" (gid {group})" if group is not None and group >= 0 else ""
        return (
            f"kernel.io_uring_disabled=1: only members of kernel.io_uring_group{g} and CAP_SYS_ADMIN may create rings"
        )
    return None


def probe_io_uring(
    *,
    live: bool,
    arch: str,
    kernel_version: list[int],
    disabled_sysctl: int | None,
    io_uring_group: int | None,
    seccomp: int | None,
) -> IoUringInfo:
    mode = SECCOMP_MODES.get(seccomp, "unknown") if seccomp is not None else "unknown"
    info = IoUringInfo(
        status="not_probed",
        reason="",
        disabled_sysctl=disabled_sysctl,
        io_uring_group=io_uring_group,
        seccomp=seccomp,
        seccomp_mode=mode,
    )
    too_old = bool(kernel_version) and tuple(kernel_version[:2]) < (5, 1)
    if not live:
        if disabled_sysctl == 2:
            info.status, info.reason = "disabled", _disabled_reason(2, io_uring_group) or ""
        elif too_old:
            info.status = "unsupported"
            info.reason = f"kernel {'.'.join(map(str, kernel_version))} predates io_uring (5.1)"
        else:
            info.reason = "not probed: the probe read a file tree, not this machine's kernel"
            if disabled_sysctl == 1:
                info.reason += f"; {_disabled_reason(1, io_uring_group)}"
        return info

    nr = IO_URING_SETUP_NR.get(arch)
    if sys.platform != "linux":
        info.status, info.reason = "unsupported", f"not Linux ({sys.platform})"
        return info
    if nr is None or arch != normalize_machine(platform.machine()):
        info.status, info.reason = "unsupported", f"io_uring_setup syscall number unknown for {arch}"
        return info

    result: tuple[int, int, int | None] | str
    if seccomp == 2 or seccomp is None:
        info.via_subprocess = True
        result = _syscall_in_child(nr)
    else:
        result = _syscall_in_process(nr)
    info.probed = True
    if isinstance(result, str):
        info.status = "blocked"
        info.reason = f"{result}; a seccomp filter ({mode}) likely forbids io_uring_setup"
        return info
    fd, err, feats = result
    if fd >= 0:
        info.status = "available"
        info.features_raw = feats
        info.features = feature_names(feats or 0)
        info.reason = "io_uring_setup succeeded"
        if disabled_sysctl == 1:
            info.reason += " (kernel.io_uring_disabled=1, this process is allowed)"
        return info
    name = errno.errorcode.get(err, str(err))
    info.errno = name
    disabled = _disabled_reason(disabled_sysctl, io_uring_group)
    if err == errno.EPERM:
        if disabled:
            info.status, info.reason = "disabled", disabled
        elif seccomp == 2:
            info.status, info.reason = "blocked", "EPERM with a seccomp filter active (container runtime profile)"
        else:
            info.status, info.reason = "blocked", "EPERM without a seccomp filter: an LSM (SELinux/AppArmor) or sandbox"
    elif err == errno.ENOSYS:
        if seccomp == 2:
            info.status, info.reason = "blocked", "ENOSYS with a seccomp filter active (container runtime profile)"
        elif too_old:
            info.status = "unsupported"
            info.reason = f"kernel {'.'.join(map(str, kernel_version))} predates io_uring (5.1)"
        else:
            info.status, info.reason = "unsupported", "ENOSYS: kernel built without CONFIG_IO_URING"
    elif err == errno.ENOMEM:
        info.status = "blocked"
        info.reason = "ENOMEM: locked-memory limit (RLIMIT_MEMLOCK) too low for a ring (kernels < 5.12)"
    else:
        info.status, info.reason = "blocked", f"io_uring_setup failed: {name} ({os.strerror(err)})"
    return info


def normalize_machine(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64", "loong64": "loongarch64"}.get(m, m)
