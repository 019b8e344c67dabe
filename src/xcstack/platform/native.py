"""Native packages: does each really import here, and what to do when one does not.

Finding a package on disk says little: a wheel built for another CPU, a missing shared library or an
emulator (qemu-user) can make `import` fail, hang or kill the process (SIGSEGV). So each import is
tried in its own child interpreter with a timeout; the caller only reads the verdict. Stdlib only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# Native packages not in probe.ACCELERATORS that doctor also tries (distribution, import name, purpose).
MORE_NATIVE: tuple[tuple[str, str, str], ...] = (
    ("pymilvus", "pymilvus", "Milvus client (grpcio)"),
    ("milvus-lite", "milvus_lite", "embedded vector store (faiss)"),
    ("PyKCS11", "PyKCS11", "PKCS#11 HSM access"),
)

# What an operator does when a package is missing or broken: the pip extra / package and what its
# source build needs (an air-gapped host has only the wheelhouse).
FIXES: dict[str, str] = {
    "uvloop": "pip install uvloop (core dependency; sdist needs a C compiler and python3-dev); "
    "without it the asyncio event loop is used",
    "orjson": "pip install orjson (core dependency; sdist needs Rust/cargo); without it the stdlib json is used",
    "granian": "pip install granian (core dependency; sdist needs Rust/cargo); "
    'without it set [server] http_server = "uvicorn"',
    "httptools": "pip install httptools (uvicorn[standard]; sdist needs a C compiler); uvicorn falls back to h11",
    "onnxruntime": "pip install onnxruntime (wheels for x86_64 and aarch64 only; elsewhere build it from source); "
    "without it set [inference] enabled = false or point the gateway at a remote embedding upstream",
    "onnxruntime-gpu": "pip install 'xcstack[gpu]' (CUDA build of onnxruntime; needs the matching CUDA/cuDNN)",
    "tokenizers": "pip install tokenizers (sdist needs Rust/cargo); needed for local inference",
    "numpy": "pip install numpy (core dependency; sdist needs a C compiler, meson and python3-dev)",
    "cryptography": "pip install cryptography (core dependency: SM3/SM4; sdist needs Rust/cargo and libssl-dev)",
    "gmssl-pyx": "optional SM2 fallback on x86_64 (pip install gmssl-pyx; no aarch64 wheel, its sdist does not "
    "build offline); the default SM2 backend is the system OpenSSL 3 (libcrypto.so.3), else gmalglib",
    "gmalglib": "SM2 backend: pip install gmalglib (its sdist is self-contained C: needs gcc and python3-dev)",
    "msgpack": "pip install msgpack (core dependency; the C extension needs a compiler, else pure Python is used)",
    "pymilvus": "pip install pymilvus (core dependency: vector search; grpcio's sdist needs a C++ compiler)",
    "milvus-lite": "pip install milvus-lite (wheels for x86_64 and aarch64 only); "
    'elsewhere use pgvector ([vector] backend = "pgvector") or a Milvus server',
    "PyKCS11": "pip install 'xcstack[pkcs11]' (PyKCS11's sdist needs swig and a C compiler); "
    "only for a PKCS#11 HSM",
}

# The module whose import loads the native code, where the package's own import does not.
_IMPORT_TARGET: dict[str, str] = {"cryptography": "cryptography.hazmat.bindings._rust"}

_CHILD = r"""
import importlib, json, sys
name, target = sys.argv[1], sys.argv[2]
out = {"status": "ok"}
try:
    m = importlib.import_module(target)
    if name == "onnxruntime":
        out["providers"] = list(m.get_available_providers())
        out["device"] = m.get_device()
except ModuleNotFoundError as exc:
    own = exc.name is not None and (name == exc.name or name.startswith(exc.name + "."))
    out = {"status": "missing" if own else "error", "detail": f"{type(exc).__name__}: {exc}"}
except BaseException as exc:
    out = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
print("\n" + json.dumps(out), flush=True)
"""


@dataclass
class ImportCheck:
    """How `import module` went in a child interpreter."""

    module: str
    status: str  # ok | missing | error (an exception) | crash (a signal) | hang (timeout)
    detail: str = ""
    signal: str | None = None  # "SIGSEGV" when status == "crash"
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # onnxruntime: providers, device

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def fix_for(dist: str) -> str:
    return FIXES.get(dist, f"pip install {dist}")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def check_import(module: str, *, timeout: float = 30.0, env: Mapping[str, str] | None = None) -> ImportCheck:
    """Try `import module` in a fresh interpreter (this one's executable and environment)."""
    t0 = time.monotonic()
    argv = [sys.executable, "-X", "faulthandler", "-c", _CHILD, module, _IMPORT_TARGET.get(module, module)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        return ImportCheck(module, "hang", f"import {module} did not finish within {timeout:g}s (killed)",
                           seconds=round(time.monotonic() - t0, 3))  # fmt: skip
    except OSError as exc:
        return ImportCheck(module, "error", f"could not start {sys.executable}: {exc}")
    secs = round(time.monotonic() - t0, 3)
    if proc.returncode < 0:
        name = _signal_name(-proc.returncode)
        fatal = next((ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("Fatal Python error")), "")
        detail = f"import {module} killed the interpreter with {name} (signal {-proc.returncode})"
        return ImportCheck(module, "crash", detail + (f": {fatal}" if fatal else ""), name, secs)
    lines = proc.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return ImportCheck(module, "error", f"import {module} failed: {last[:300]}", seconds=secs)
    info = {k: v for k, v in data.items() if k not in ("status", "detail")}
    return ImportCheck(module, str(data.get("status")), str(data.get("detail", ""))[:300], seconds=secs, info=info)


def check_imports(modules: Iterable[str], *, timeout: float = 30.0, parallel: int | None = None,
                  env: Mapping[str, str] | None = None) -> dict[str, ImportCheck]:  # fmt: skip
    """`check_import` for each module, a few at a time (bounded by the CPU count)."""
    mods = list(dict.fromkeys(modules))
    if not mods:
        return {}
    width = parallel or max(2, min(len(mods), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="xc-import-check") as pool:
        results = list(pool.map(lambda m: check_import(m, timeout=timeout, env=env), mods))
    return dict(zip(mods, results, strict=True))
