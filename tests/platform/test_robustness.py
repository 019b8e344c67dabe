"""The probe is best effort: garbled, binary or unreadable files never make it raise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from xcstack.platform.doctor import DoctorResult, render_text
from xcstack.platform.plan import derive_plan
from xcstack.platform.probe import probe
from xcstack.platform.sysctl import render_sysctl, sysctl_advice

from .helpers import FIXTURES

GARBAGE = [b"", b"\x00\xff\xfe garbage \x80", b"max max max", b"-1", b"0-", b"abc: def\n:::\n", b"9" * 40]


@pytest.mark.parametrize("junk", GARBAGE, ids=range(len(GARBAGE)))
def test_garbled_tree(tmp_path: Path, junk: bytes) -> None:
    for src in ("container-cpuset-quota", "hygon-7285-openeuler-2003", "loongson-3a6000-uos20"):
        root = tmp_path / src
        shutil.copytree(FIXTURES / src, root)
        for dirpath, _, files in os.walk(root):
            for f in files:
                Path(dirpath, f).write_bytes(junk)
        r = probe(root)
        p = derive_plan(r)
        assert p.http_workers >= 1
        assert r.cpus.usable
        assert "net.core.somaxconn = " in render_sysctl(r)
        assert "[plan]" in render_text(DoctorResult(r, p, [], sysctl_advice(r)))
        assert r.to_json() and p.to_json()


def test_unreadable_cpuinfo_is_reported(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads files regardless of mode: use a directory where a file is expected instead
        (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)
    else:
        (tmp_path / "proc").mkdir()
        f = tmp_path / "proc" / "cpuinfo"
        f.write_text("processor : 0\n")
        f.chmod(0)
    r = probe(tmp_path, machine="x86_64")
    assert any(e.startswith("proc/cpuinfo") for e in r.errors)
    text = render_text(DoctorResult(r, derive_plan(r)))
    assert "unreadable: proc/cpuinfo" in text
