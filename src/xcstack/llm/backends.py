"""Which backends the installed llama.cpp build has (CPU, CUDA, CANN, Vulkan...), for `xcstack doctor`.

Asked in a child interpreter: a build for the wrong CPU or a missing driver library can crash the
process that loads it, and doctor must survive that to report it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

_CHILD = r"""
import json
import xllamacpp as x
devices = []
for d in x.get_device_info():
    devices.append({"name": d.get("name"), "description": d.get("description"),
                    "type": getattr(d.get("type"), "name", str(d.get("type"))).rsplit("_", 1)[-1],
                    "memory_total": d.get("memory_total")})
print(json.dumps({"version": x.__version__, "devices": devices, "system_info": x.get_system_info().strip()}))
"""

KNOWN = ("CPU", "CUDA", "CANN", "ROCm", "HIP", "Vulkan", "Metal", "SYCL", "OpenCL", "MUSA")


def summarise(info: dict[str, Any]) -> dict[str, Any]:
    """`backends`: the device families (CUDA0, CUDA1 -> CUDA), and a yes/no for the ones xcstack documents."""
    families = sorted({re.sub(r"\d+$", "", str(d.get("name") or "")) for d in info.get("devices", [])} - {""})
    info["backends"] = families
    for name in ("CPU", "CUDA", "CANN"):
        info[name.lower()] = name in families
    return info


def llm_backends(timeout: float = 60.0) -> dict[str, Any]:
    """{"installed": False} without xllamacpp; else its version, devices, backends, or the error."""
    import importlib.util

    if importlib.util.find_spec("xllamacpp") is None:
        return {"installed": False, "fix": "pip install 'xcstack[llm]' (xllamacpp: wheels for x86_64 and aarch64; "
                "CUDA/ROCm/Vulkan builds from its own index; for Ascend build llama.cpp with GGML_CANN, see "
                "docs/inference.md)"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"installed": True, "error": f"loading llama.cpp hung for {timeout:g} s"}
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"installed": True, "error": f"loading llama.cpp failed: {why}"}
    try:
        info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"installed": True, "error": "llama.cpp's device list was not readable"}
    return summarise({"installed": True, **info})


def render(info: dict[str, Any]) -> list[str]:
    """The `[llm]` section of doctor's text report."""
    if not info:
        return []
    out = ["[llm] llama.cpp (xllamacpp)"]
    if not info.get("installed"):
        out.append(f"  not installed: {info.get('fix')}")
    elif info.get("error"):
        out.append(f"  BROKEN: {info['error']}")
    else:
        yes = {True: "yes", False: "no"}
        out.append(f"  version {info.get('version')}; backends {', '.join(info.get('backends') or ['-'])} "
                   f"(CPU {yes[bool(info.get('cpu'))]}, CUDA {yes[bool(info.get('cuda'))]}, "
                   f"CANN {yes[bool(info.get('cann'))]})")
        for d in info.get("devices") or []:
            mem = d.get("memory_total")
            out.append(f"  device {d.get('name')}: {d.get('description')} ({d.get('type')}"
                       + (f", {mem / 2**30:.1f} GiB" if mem else "") + ")")
    return out
