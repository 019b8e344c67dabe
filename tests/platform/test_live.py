"""The real probe on this machine returns sane values and a plan that fits them."""

from __future__ import annotations

import json
import os
import platform

from xcstack.platform.plan import derive_plan
from xcstack.platform.probe import probe


def test_live_probe_is_sane() -> None:
    r = probe()
    assert r.live and r.root == "/"
    assert r.arch == {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    assert r.cpu.logical_cpus >= 1
    assert r.cpu.model and r.cpu.model != "unknown"
    assert r.cpus.online and set(r.cpus.usable) <= set(r.cpus.online)
    assert r.cpus.affinity is not None
    assert set(r.cpus.usable) <= os.sched_getaffinity(0)
    assert 0 < r.cpus.budget <= len(r.cpus.usable)
    assert r.os.kernel == platform.release()
    assert r.os.id != "unknown"
    assert r.limits.somaxconn and r.limits.somaxconn > 0
    assert r.limits.nofile_soft is not None and r.limits.nofile_hard is not None
    assert r.memory.total_bytes and r.memory.total_bytes > 2**26
    assert r.io_uring.status in {"available", "disabled", "blocked", "unsupported"} and r.io_uring.reason
    assert r.python.probed and r.python.has("uvloop") == any(
        p.name == "uvloop" and p.present for p in r.python.packages
    )
    if r.python.has("onnxruntime"):
        assert "CPUExecutionProvider" in r.python.onnxruntime_providers
    json.loads(r.to_json())

    p = derive_plan(r)
    assert p.http_workers >= 1 and p.model_workers >= 1
    cores = {c for g in p.http_cpus + p.model_cpus for c in g}
    assert cores <= set(r.cpus.usable)
    if len(r.cpus.usable) >= 2:
        assert not p.shared_cores
    json.loads(p.to_json())


def test_probe_does_not_import_heavy_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from xcstack.platform.probe import probe; from xcstack.platform.plan import derive_plan; "
        "derive_plan(probe()); "
        "heavy = ('onnxruntime', 'numpy', 'uvloop', 'orjson', 'granian', 'cryptography'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
