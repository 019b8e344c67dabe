"""Lean http workers (issue 15, item 3): a worker imports what its capabilities use.

Each test builds an http worker's app exactly as `xcstack.worker` does (`build_worker_app`, every
capability module, the config deciding which are on) in a fresh interpreter, and looks at `sys.modules`:
an import made once in a long-lived test process would hide what a worker really loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BUILD = """
import json, os, sys
from xcstack.config import load_settings
from xcstack.worker import build_worker_app

build_worker_app(load_settings(os.environ["XC_CONFIG"]), lambda: None)
loaded = sorted({m.split(".")[0] for m in sys.modules} | {m for m in sys.modules if m.startswith("xcstack.")})
if os.environ.get("XC_TEST_GRANIAN"):  # the imports run_granian makes before serving
    from xcstack.worker import GRANIAN_UNUSED_IMPORTS, hidden_modules
    with hidden_modules(GRANIAN_UNUSED_IMPORTS):
        import granian.constants, granian.http, granian.server.embed, granian._granian
    loaded = sorted(set(loaded) | {m.split(".")[0] for m in sys.modules})
after = {}
if os.environ.get("XC_TEST_IMPORT_AFTER"):  # what the worker hid must stay importable afterwards
    import importlib
    after = {m: importlib.import_module(m).__name__ for m in os.environ["XC_TEST_IMPORT_AFTER"].split(",")}
print(json.dumps({"loaded": loaded, "after": after}))
"""

UPSTREAM = '[[gateway.upstreams]]\nname = "mock"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["mock-model"]\n'


def _worker_modules(tmp_path: Path, config: str, import_after: str = "", granian: bool = False
                    ) -> dict[str, list[str]]:
    cfg = tmp_path / "xcstack.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n{config}\n{UPSTREAM}')
    env = {**os.environ, "XC_CONFIG": str(cfg), "PYTHONPATH": str(REPO / "src"),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "XC_TEST_IMPORT_AFTER": import_after,
           "XC_TEST_GRANIAN": "1" if granian else ""}
    out = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_llm_gateway_worker_loads_no_model_or_vector_stack(tmp_path: Path) -> None:
    """Gateway, security and crypto on; inference and vectors off: no numpy, no model runtime, no Milvus
    client (its pandas, pyarrow and gRPC). numpy came in through the inference capability module alone."""
    res = _worker_modules(tmp_path, "[inference]\nenabled = false\n\n[vector]\nenabled = false\n")
    loaded = set(res["loaded"])
    assert {"xcstack", "aiohttp", "starlette"} <= loaded  # the gateway and security really were built
    forbidden = {"numpy", "onnxruntime", "tokenizers", "pymilvus", "pandas", "pyarrow", "grpc", "milvus_lite",
                 "psycopg", "pymysql"}
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_llm_gateway_worker_defers_what_its_requests_do_not_use(tmp_path: Path) -> None:
    """The same worker (console on, as by default) leaves out what only rare requests need: jinja2 and
    qrcode until the first console page or TOTP enrolment, openapi.py (every capability's protocol models)
    until the first /openapi.json; Granian comes without watchfiles (its --reload). All stay importable."""
    res = _worker_modules(tmp_path, "[inference]\nenabled = false\n\n[vector]\nenabled = false\n", granian=True,
                          import_after="jinja2,qrcode,watchfiles,xcstack.openapi")
    loaded = set(res["loaded"])
    assert {"xcstack.console.capability", "xcstack.console.routes", "granian"} <= loaded  # console and Granian in
    deferred = {"jinja2", "markupsafe", "qrcode", "watchfiles", "setproctitle", "xcstack.openapi"}
    assert not loaded & deferred, sorted(loaded & deferred)
    assert res["after"] == {"jinja2": "jinja2", "qrcode": "qrcode", "watchfiles": "watchfiles",
                            "xcstack.openapi": "xcstack.openapi"}


def test_every_capability_worker_leaves_arrow_and_models_out(tmp_path: Path) -> None:
    """Every capability on, Milvus Lite in its side process (the `xcstack serve` default): the worker holds
    the Milvus client (pymilvus, its pandas and gRPC) but not pyarrow, which pandas would load for nothing
    (~70 MB), nor Milvus Lite, onnxruntime or tokenizers; pyarrow stays importable for whoever needs it."""
    res = _worker_modules(tmp_path, '[vector.milvus]\nlite_mode = "side_process"\nlite_port = 65000\n',
                          import_after="pyarrow")
    loaded = set(res["loaded"])
    assert {"numpy", "pymilvus", "pandas"} <= loaded  # vectors and inference really were built
    assert not loaded & {"pyarrow", "milvus_lite", "onnxruntime", "tokenizers"}, sorted(
        loaded & {"pyarrow", "milvus_lite", "onnxruntime", "tokenizers"})
    assert res["after"] == {"pyarrow": "pyarrow"}
