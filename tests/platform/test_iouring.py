"""io_uring: the real syscall on this machine, and the outcome mapping for every failure mode."""

from __future__ import annotations

import errno
import platform

import pytest

from xcstack.platform import iouring
from xcstack.platform.iouring import STATUSES, feature_names, probe_io_uring
from xcstack.platform.probe import probe

ARCH = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def live(**kw: object) -> iouring.IoUringInfo:
    args: dict[str, object] = {"live": True, "arch": ARCH, "kernel_version": [6, 6, 0], "disabled_sysctl": 0,
                               "io_uring_group": -1, "seccomp": 0}  # fmt: skip
    args.update(kw)
    return probe_io_uring(**args)  # type: ignore[arg-type]


def test_real_probe_on_this_machine() -> None:
    io = probe().io_uring
    assert io.status in {"available", "disabled", "blocked", "unsupported"}
    assert io.reason
    assert io.probed
    if io.status == "available":
        assert "SINGLE_MMAP" in io.features  # every kernel >= 5.4
        assert io.errno is None
    else:
        assert io.errno or "killed" in io.reason


def test_real_syscall_in_child_interpreter_agrees() -> None:
    nr = iouring.IO_URING_SETUP_NR.get(ARCH)
    if nr is None:
        pytest.skip(f"no syscall number for {ARCH}")
    child = iouring._syscall_in_child(nr)
    parent = iouring._syscall_in_process(nr)
    assert not isinstance(child, str), child
    assert (child[0] >= 0) == (parent[0] >= 0)
    if parent[0] >= 0:
        assert child[2] == parent[2]  # same feature bits
    else:
        assert child[1] == parent[1]  # same errno


def test_seccomp_filter_probes_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(nr: int) -> tuple[int, int, int | None]:
        raise AssertionError("in-process syscall while a seccomp filter is active")

    monkeypatch.setattr(iouring, "_syscall_in_process", boom)
    monkeypatch.setattr(iouring, "_syscall_in_child", lambda nr, timeout=10.0: "probe child killed by SIGSYS")
    io = live(seccomp=2)
    assert io.via_subprocess
    assert io.status == "blocked"
    assert "SIGSYS" in io.reason and "seccomp" in io.reason


@pytest.mark.parametrize(
    ("err", "kw", "status", "needle"),
    [
        (errno.EPERM, {"disabled_sysctl": 2}, "disabled", "io_uring_disabled=2"),
        (errno.EPERM, {"disabled_sysctl": 1, "io_uring_group": 1001}, "disabled", "gid 1001"),
        (errno.EPERM, {"seccomp": 2}, "blocked", "seccomp"),
        (errno.EPERM, {}, "blocked", "LSM"),
        (errno.ENOSYS, {"seccomp": 2}, "blocked", "seccomp"),
        (errno.ENOSYS, {"kernel_version": [4, 19, 90]}, "unsupported", "predates"),
        (errno.ENOSYS, {}, "unsupported", "CONFIG_IO_URING"),
        (errno.ENOMEM, {}, "blocked", "RLIMIT_MEMLOCK"),
        (errno.EINVAL, {}, "blocked", "EINVAL"),
    ],
)
def test_errno_mapping(
    monkeypatch: pytest.MonkeyPatch, err: int, kw: dict[str, object], status: str, needle: str
) -> None:
    monkeypatch.setattr(iouring, "_syscall_in_process", lambda nr: (-1, err, None))
    monkeypatch.setattr(iouring, "_syscall_in_child", lambda nr, timeout=10.0: (-1, err, None))
    io = live(**kw)
    assert io.status == status
    assert needle in io.reason
    assert io.errno == errno.errorcode[err]
    assert io.status in STATUSES


def test_available_with_group_restriction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iouring, "_syscall_in_process", lambda nr: (7, 0, 0b11))
    io = live(disabled_sysctl=1)
    assert io.status == "available"
    assert io.features == ["SINGLE_MMAP", "NODROP"]
    assert "this process is allowed" in io.reason


def test_unknown_arch_is_unsupported_without_syscall() -> None:
    io = live(arch="sparc64")
    assert io.status == "unsupported" and not io.probed


def test_feature_names_unknown_bits() -> None:
    assert feature_names(0) == []
    assert feature_names(1 << 30) == ["0x40000000"]


def test_not_live_never_probes() -> None:
    io = probe_io_uring(live=False, arch=ARCH, kernel_version=[6, 1], disabled_sysctl=1, io_uring_group=5,
                        seccomp=0)  # fmt: skip
    assert io.status == "not_probed" and not io.probed
    assert "io_uring_disabled=1" in io.reason
