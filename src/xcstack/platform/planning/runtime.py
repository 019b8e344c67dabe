"""Runtime choices the plan makes from the Python probe: event loop, JSON library, onnxruntime options.

What does not import here is left out (uvloop, orjson), and a broken onnxruntime is named, so a worker
never crashes on an accelerator the machine cannot load.
"""

from __future__ import annotations

from typing import Any

from xcstack.platform.planning.findings import Findings
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.probe import PlatformReport, PythonInfo

WHEEL_ARCHES = frozenset({"x86_64", "aarch64"})  # archs with uvloop/orjson/onnxruntime wheels on PyPI


def import_problem(report: PlatformReport, module: str) -> str:
    """Why `module` cannot be used on the probed machine ("" when it can, or when imports were not probed)."""
    py = report.python
    if not py.probed or py.has(module):
        return ""
    pkg = py.package(module)
    if pkg is None or not pkg.present:
        return "not installed"
    return pkg.detail or pkg.status


def loop_and_json(report: PlatformReport, ov: PlanOverrides, found: Findings) -> tuple[str, str]:
    """Phase: (event loop, JSON library); uvloop/orjson only where they import (or wheels exist, unprobed)."""
    py = report.python
    arch = report.arch
    uvloop_ok = py.has("uvloop") if py.probed else arch in WHEEL_ARCHES
    orjson_ok = py.has("orjson") if py.probed else arch in WHEEL_ARCHES
    if not py.probed:
        found.notes.append(
            f"Python accelerators not probed (root={report.root}); assuming PyPI wheels exist for {arch}"
            if arch in WHEEL_ARCHES
            else f"Python accelerators not probed (root={report.root})"
        )
    want_loop = ov.event_loop or "auto"
    if ov.event_loop and ov.event_loop != "auto":
        found.overridden.append("event_loop")
    for module, instead in (("uvloop", "the asyncio event loop"), ("orjson", "the stdlib json")):
        pkg = py.package(module) if py.probed else None
        if pkg is not None and pkg.present and not pkg.works:
            found.warnings.append(f"{module} is installed but does not import ({pkg.detail}): using {instead}")
    if want_loop == "asyncio":
        loop = "asyncio"
    elif uvloop_ok:
        loop = "uvloop"
    else:
        loop = "asyncio"
        if want_loop == "uvloop":
            found.warnings.append("server.loop = uvloop but uvloop is not importable: falling back to asyncio")
    json_lib = "orjson" if orjson_ok else "json"
    if arch.startswith("loongarch"):
        found.warnings.append(
            "LoongArch: PyPI has no loongarch64 wheels for uvloop, orjson, onnxruntime, cryptography or granian; "
            f"event loop {loop}, JSON {json_lib}; use uvicorn, and install onnxruntime/cryptography from the "
            "distribution or a source build"
        )
    if report.emulation:
        found.warnings.append(report.emulation)
    return loop, json_lib


def onnxruntime_options(py: PythonInfo) -> dict[str, Any]:
    """Recommended session options: one single-threaded, non-spinning session per pinned model worker."""
    providers = [p for p in py.onnxruntime_providers] or ["CPUExecutionProvider"]
    return {
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "session.intra_op.allow_spinning": "0",
        "providers": [p for p in providers if p != "AzureExecutionProvider"],
    }
