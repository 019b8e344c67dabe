"""Doctor tests instead of trusting (issue 13, item 4): native imports are tried in a child interpreter
(a crash is reported with its signal, a hang as a hang), `uname -m` is checked against /proc/cpuinfo,
and the tuning plan leaves out what does not work.

The broken packages are real modules on a temporary PYTHONPATH that shadow the installed ones: one
that kills its interpreter with SIGSEGV (as `import onnxruntime` does under qemu-user), one that never
returns, one whose shared library is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xcstack.platform.cpu import identify_cpu_checked
from xcstack.platform.doctor import collect, render_text
from xcstack.platform.native import check_import, check_imports
from xcstack.platform.plan import derive_plan
from xcstack.platform.probe import probe, probe_python

from .helpers import FIXTURES, fx

SEGV = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
HANG = "import time\ntime.sleep(3600)\n"
NO_LIB = "raise ImportError('libgomp.so.1: cannot open shared object file: No such file or directory')\n"
NEEDS_MISSING = "import xc_test_dependency_that_is_not_there\n"


@pytest.fixture
def stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PYTHONPATH dir that this process (find_spec) and its children (the imports) both see first."""
    d = tmp_path / "stubs"
    d.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH", "")])))
    monkeypatch.syspath_prepend(str(d))
    return d


def test_crash_is_reported_with_its_signal(stubs: Path) -> None:
    (stubs / "xc_segv_mod.py").write_text(SEGV)
    r = check_import("xc_segv_mod", timeout=30)
    assert r.status == "crash" and r.signal == "SIGSEGV", r
    assert "SIGSEGV (signal 11)" in r.detail and not r.ok


def test_hang_is_reported_as_a_hang(stubs: Path) -> None:
    (stubs / "xc_hang_mod.py").write_text(HANG)
    r = check_import("xc_hang_mod", timeout=1.5)
    assert r.status == "hang" and "1.5s" in r.detail, r
    assert r.seconds < 10


def test_import_errors_missing_and_ok(stubs: Path) -> None:
    (stubs / "xc_nolib_mod.py").write_text(NO_LIB)
    (stubs / "xc_needs_mod.py").write_text(NEEDS_MISSING)
    res = check_imports(["xc_nolib_mod", "xc_needs_mod", "xc_test_not_installed_at_all", "json"], timeout=30)
    assert res["xc_nolib_mod"].status == "error" and "libgomp.so.1" in res["xc_nolib_mod"].detail
    # a package that is there but needs a missing one is broken, not missing
    assert res["xc_needs_mod"].status == "error"
    assert "xc_test_dependency_that_is_not_there" in res["xc_needs_mod"].detail
    assert res["xc_test_not_installed_at_all"].status == "missing"
    assert res["json"].ok


def test_probe_and_plan_leave_out_crashing_packages(stubs: Path) -> None:
    """onnxruntime and uvloop found on disk but crashing on import: reported as crashes with the fix,
    no model workers planned, the asyncio loop chosen. Nothing crashes in this process."""
    (stubs / "onnxruntime.py").write_text(SEGV)
    (stubs / "uvloop.py").write_text(SEGV)
    py = probe_python(imports="all", timeout=60)
    ort, uvl = py.package("onnxruntime"), py.package("uvloop")
    assert ort is not None and uvl is not None
    assert (ort.present, ort.status, uvl.status) == (True, "crash", "crash")
    assert "SIGSEGV" in ort.detail and "pip install onnxruntime" in ort.fix
    assert not py.has("onnxruntime") and not py.has("uvloop") and py.has("orjson")
    # granian imports uvloop when it is there, so it goes down with it; the others are unaffected
    assert {p.module for p in py.problems()} - {"granian"} == {"onnxruntime", "uvloop"}
    assert all(py.has(m) for m in ("numpy", "cryptography", "tokenizers", "msgpack"))
    assert py.onnxruntime_providers == [] and py.onnxruntime_error and "SIGSEGV" in py.onnxruntime_error

    report = dataclasses.replace(probe(fx("intel-xeon-debian12")), python=py)
    plan = derive_plan(report)
    assert plan.model_workers == 0 and plan.model_cpus == [] and plan.compute_cores == []
    assert plan.http_workers == len(report.cpus.usable)  # every core serves http
    assert plan.event_loop == "asyncio" and plan.json_library == "orjson"
    assert any("onnxruntime is not importable" in w and "SIGSEGV" in w for w in plan.warnings), plan.warnings
    assert any(w.startswith("uvloop is installed but does not import") for w in plan.warnings), plan.warnings


def test_plan_probe_tries_what_the_plan_depends_on(stubs: Path) -> None:
    """The supervisor's probe (imports="plan") tries uvloop, orjson and onnxruntime, not everything."""
    (stubs / "onnxruntime.py").write_text(SEGV)
    (stubs / "granian.py").write_text(SEGV)
    py = probe_python()
    ort, gr = py.package("onnxruntime"), py.package("granian")
    assert ort is not None and ort.status == "crash"
    assert gr is not None and gr.status == "unchecked" and gr.present


def test_doctor_cli_reports_a_crashing_import(tmp_path: Path) -> None:
    """End to end, as an operator runs it: `xcstack doctor --json` survives onnxruntime's SIGSEGV."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "onnxruntime.py").write_text(SEGV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "xcstack", "doctor", "--json", "--no-check-flags"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    ort = [p for p in data["problems"] if p["package"] == "onnxruntime"]
    assert len(ort) == 1 and ort[0]["status"] == "crash" and "SIGSEGV" in ort[0]["reason"], data["problems"]
    assert data["plan"]["model_workers"] == 0
    r = subprocess.run([sys.executable, "-m", "xcstack", "doctor", "--no-check-flags"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for needle in ("CRASHES on import", "[packages to fix]", "fix: pip install onnxruntime"):
        assert needle in r.stdout, needle


# --- uname -m against /proc/cpuinfo -----------------------------------------------------------------
def test_emulated_aarch64_on_an_x86_host_is_called_emulation() -> None:
    """qemu-user: an aarch64 userland (uname -m aarch64) reads the x86 host's /proc/cpuinfo."""
    r = probe(fx("intel-xeon-debian12"), machine="aarch64")
    assert r.arch == "aarch64"
    assert r.emulation and "uname -m says aarch64" in r.emulation and "emulation" in r.emulation
    assert "x86_64" in r.emulation and "Xeon" in r.emulation
    # the host's Xeon is not presented as this machine's CPU, nor its x86-64 level or AVX-512
    assert r.cpu.vendor == "generic" and r.cpu.x86_level is None and not r.cpu.domestic
    assert r.cpu.model.startswith("unknown aarch64 CPU") and not any(r.cpu.features.values())
    assert r.cpu.logical_cpus > 0
    plan = derive_plan(r)
    assert r.emulation in plan.warnings
    assert plan.build.target == "armv8-a" and "x86" not in plan.build.host_cflags
    text = render_text(collect(fx("intel-xeon-debian12"), machine="aarch64", check_flags=False))
    assert "DISAGREE" in text and "architecture mismatch" in text and "x86-64 level" not in text


def test_x86_userland_on_an_arm_host_is_a_mismatch_too() -> None:
    cpu, note = identify_cpu_checked((fx("kunpeng920-kylin-v10") / "proc" / "cpuinfo").read_text(), "x86_64")
    assert note and "uname -m says x86_64" in note and "aarch64" in note
    assert cpu.arch == "x86_64" and cpu.vendor == "generic"


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if (p / "proc" / "cpuinfo").is_file()))
def test_no_mismatch_when_they_agree(name: str) -> None:
    r = probe(fx(name))
    assert r.emulation is None
    assert probe(fx(name), machine=r.arch).emulation is None
    assert not any("architecture mismatch" in w for w in derive_plan(r).warnings)


def test_this_machine_agrees_with_itself() -> None:
    r = probe(python=False)
    assert r.emulation is None and r.cpu.model != "unknown"


def test_doctor_names_the_sm2_backend_asked_in_a_child() -> None:
    from xcstack.platform.doctor import sm2_backend

    info = sm2_backend()
    assert info["name"] in ("openssl", "gmssl-pyx", "gmalglib") and info["constant_time"] in (True, False)
    out = subprocess.run([sys.executable, "-m", "xcstack", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "XC_SM2_BACKEND": "gmalglib"})
    assert out.returncode == 0, out.stderr
    sm2 = json.loads(out.stdout)["sm2"]
    assert sm2["name"] == "gmalglib" and sm2["constant_time"] is False  # what doctor says is what runs
