"""io_uring behind a real seccomp filter: a child interpreter installs a BPF filter on io_uring_setup
(as container runtimes do) and runs the probe; the probe must report `blocked`, and survive a filter
that kills the caller (SECCOMP_RET_KILL_PROCESS) because it then makes the syscall in a grandchild."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in {"x86_64", "aarch64"}, reason="Linux x86_64/aarch64 only"
)

CHILD = r"""
import ctypes, dataclasses, json, struct, sys
action = int(sys.argv[1], 0)
libc = ctypes.CDLL(None, use_errno=True)
class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]
prog = (SockFilter * 4)(
    SockFilter(0x20, 0, 0, 0),            # ld  [nr]
    SockFilter(0x15, 0, 1, 425),          # jeq #425 (io_uring_setup), next, skip
    SockFilter(0x06, 0, 0, action),       # ret action
    SockFilter(0x06, 0, 0, 0x7FFF0000),   # ret ALLOW
)
fprog = SockFprog(4, prog)
assert libc.prctl(38, 1, 0, 0, 0) == 0                       # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
from xcstack.platform.probe import probe
r = probe(python=False)
print(json.dumps(dataclasses.asdict(r.io_uring)))
"""


def run_child(action: int) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, hex(action)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_seccomp_errno_eperm_is_blocked() -> None:
    io = run_child(0x00050000 | 1)  # SECCOMP_RET_ERRNO | EPERM
    assert io["seccomp"] == 2 and io["seccomp_mode"] == "filter"
    assert io["via_subprocess"] is True
    assert io["status"] == "blocked"
    assert io["errno"] == "EPERM"
    assert "seccomp" in str(io["reason"])


def test_seccomp_errno_enosys_is_blocked_not_unsupported() -> None:
    io = run_child(0x00050000 | 38)  # SECCOMP_RET_ERRNO | ENOSYS
    assert io["status"] == "blocked" and io["errno"] == "ENOSYS"


def test_seccomp_kill_does_not_kill_the_prober() -> None:
    io = run_child(0x80000000)  # SECCOMP_RET_KILL_PROCESS
    assert io["status"] == "blocked"
    assert "SIGSYS" in str(io["reason"])
