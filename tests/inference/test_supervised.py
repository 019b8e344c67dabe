"""End to end under the real supervisor (`xcstack serve`): model workers come from `side_processes`,
/v1/embeddings (through the gateway's local path when it is mounted) and /v2 infer work, and a model
worker killed with SIGKILL gives fast retriable 503s until the supervisor has respawned it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.core.served import Served
from tests.inference.conftest import MODEL_NAMES

MODEL = "all-minilm-l6-v2"


def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def model_worker_pids(served: Served) -> list[int]:
    assert served.proc is not None
    out = subprocess.run(["pgrep", "-P", str(served.proc.pid), "-f", "xcstack.inference.worker:main"],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_repo: Path):  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("served")
    s = Served(data, plugins="[]", env={
        "XC_INFERENCE__MODEL_REPOSITORY": str(model_repo),
        "XC_INFERENCE__WORKERS": "1",
        "XC_SERVER__RESPAWN_BACKOFF_MAX_S": "0.5",
    })
    s.start(timeout=120)
    deadline = time.monotonic() + 60
    while s.status("/v2/health/ready") != 200:
        assert time.monotonic() < deadline, "".join(s.output[-40:])
        time.sleep(0.2)
    yield s
    s.stop()


def test_embeddings_and_infer_through_the_supervisor(served: Served) -> None:
    status, _, body = post(served.base, "/v1/embeddings", {"input": ["你好", "hello"], "model": MODEL})
    assert status == 200, body
    assert len(body["data"]) == 2 and len(body["data"][0]["embedding"]) == 384
    status, _, body = post(served.base, f"/v2/models/{MODEL}/infer", {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [101, 7592, 102]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]}]})
    assert status == 200, body
    [pid] = model_worker_pids(served)
    import asyncio

    from xcstack.ipc.channel import IPCClient

    async def health() -> dict[str, Any]:
        client = IPCClient(Path(served.env["XC_DATA_DIR"]) / "run" / "inference-0.sock")
        try:
            return (await client.call("health", {}))[0]
        finally:
            await client.close()

    h = asyncio.run(health())
    assert h["pid"] == pid and h["omp_num_threads"] == "1"
    if (os.cpu_count() or 1) > 1:
        assert len(h["affinity"]) == 1, h  # pinned to the core the tuning plan gave it
    assert set(h["models"]) == set(MODEL_NAMES)  # every model of the default repository (MiniLM and e5)


def test_killed_model_worker_is_respawned_and_callers_get_retriable_503(served: Served) -> None:
    [pid] = model_worker_pids(served)
    os.kill(pid, signal.SIGKILL)
    seen: list[int] = []
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        status, headers, body = post(served.base, "/v1/embeddings", {"input": "again", "model": MODEL})
        assert time.monotonic() - t0 < 5, "a call hung on a dead worker"
        seen.append(status)
        if status == 200 and len(seen) > 1:
            break
        if status != 200:
            assert status == 503 and "retry-after" in {k.lower() for k in headers}, (status, body)
        time.sleep(0.05)
    assert seen[-1] == 200, seen
    assert 503 in seen, seen  # the dead worker was noticed, not hidden behind a timeout
    assert model_worker_pids(served) and model_worker_pids(served) != [pid]
