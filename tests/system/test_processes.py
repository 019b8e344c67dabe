"""The process table: the supervisor's writer (atomic, complete, published on spawn and death) and
`GET /v1/system/processes` (the table with the answering worker marked; this process alone without a
supervisor or with a damaged file, never a 500; the sysadmin's only: 403 `forbidden` for the others)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.contract.schema import Contract
from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.security.service import SYSTEM
from xcstack.system.table import STATUS_ENV, StatusWriter, plan_summary, planned_threads, read_table, write_atomic

PW = "Processes-Pass-2024!"


def _row(pid: int, **kw: Any) -> dict[str, Any]:
    row = {"role": "side", "kind": "model-worker", "name": "model-worker[0]", "index": 0, "pid": pid, "cpus": [1],
           "threads": 1, "started_at": 1_800_000_000.0, "restarts": 0, "ready": True, "last_exit": None,
           "state": "running"}
    return {**row, **kw}


def test_writer_publishes_the_whole_table_atomically(tmp_path: Path) -> None:
    plan = SimpleNamespace(usable_cpus=[0, 1], cpu_budget=2.0, cpu_slots=2, pin=True, http_workers=1,
                           model_workers=1, io_cores=[0], compute_cores=[1], shared_cores=False, event_loop="uvloop",
                           llm_cpus=[], llm_threads=0, warnings=[], onnxruntime={"not": "shown"})
    w = StatusWriter(tmp_path / "run" / "processes.json", plan, clock=lambda: 1_800_000_123.0)
    assert w.publish([_row(123)])
    doc = read_table(w.path)
    assert doc["supervisor"] == {"pid": os.getpid(), "started_at": 1_800_000_123.0}
    assert doc["cpu_count"] == os.cpu_count() and doc["updated_at"] == 1_800_000_123.0
    assert doc["plan"] == plan_summary(plan) and doc["plan"]["compute_cores"] == [1]
    assert "onnxruntime" not in doc["plan"]  # the summary, not the whole plan
    assert doc["processes"] == [_row(123)]

    # a write that fails (here: a value JSON cannot hold) leaves the previous table whole and no temporary file
    assert not w.publish([_row(124, cpus={1})])
    assert read_table(w.path)["processes"] == [_row(123)]
    assert sorted(p.name for p in w.path.parent.iterdir()) == ["processes.json"]

    # a reader never sees half a table while the writer replaces it over and over
    stop, torn = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads(w.path.read_bytes())
            except ValueError as exc:
                torn.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(300):
        w.publish([_row(1000 + j, name=f"model-worker[{j}]", index=j) for j in range(i % 40)])
    stop.set()
    reader.join()
    assert torn == []
    w.remove()
    assert not w.path.exists()


def test_write_atomic_keeps_the_old_file_when_replace_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.json"
    write_atomic(path, {"version": 1, "n": 1})

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_atomic(path, {"version": 1, "n": 2})
    assert json.loads(path.read_text()) == {"version": 1, "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_planned_threads() -> None:
    from xcstack.llm.worker import THREADS_ENV

    assert planned_threads("llm-worker", [2, 3], {THREADS_ENV: "2"}) == 2
    assert planned_threads("llm-worker", [2, 3, 4], {}) == 3  # one per core, as the llm worker does
    assert planned_threads("model-worker", [1], {}) == 1
    assert planned_threads("hsm-owner", [], {}) is None
    assert plan_summary(None) is None


def test_supervisor_publishes_spawn_readiness_and_death(tmp_path: Path) -> None:
    """The supervisor's own bookkeeping, without serving: a side process is started (row running, pid),
    found ready by its check, killed (row restarting, restarts 1, last exit -9), started again."""
    from xcstack.supervisor import Child, Supervisor

    sup = Supervisor(load_settings(None, data_dir=tmp_path), modules=[])
    ready = {"ok": False}
    child = Child("probe-side", 0, [sys.executable, "-c", "import time; time.sleep(60)"], [0], {},
                  ready_check=lambda _i: ready["ok"], threads=None)
    sup.side.append(child)
    try:
        sup._spawn(child)
        (row,) = read_table(sup.status.path)["processes"]
        assert (row["name"], row["pid"], row["cpus"], row["state"], row["ready"]) == (
            "probe-side[0]", child.proc.pid, [0], "running", False)  # type: ignore[union-attr]
        assert os.environ.get(STATUS_ENV) is None  # told to the children, not set here
        ready["ok"] = True
        sup._tick()
        assert read_table(sup.status.path)["processes"][0]["ready"] is True
        first = child.proc.pid  # type: ignore[union-attr]
        os.kill(first, signal.SIGKILL)
        child.proc.wait(10)  # type: ignore[union-attr]
        child.ready_check = lambda _i: False
        sup._tick()
        row = read_table(sup.status.path)["processes"][0]
        assert (row["restarts"], row["last_exit"], row["ready"]) == (1, -9, False)
        assert row["state"] in ("restarting", "running")  # respawned at once when no backoff is due
        deadline = time.monotonic() + 10
        while child.proc is None:
            assert time.monotonic() < deadline
            sup._tick()
            time.sleep(0.05)
        row = read_table(sup.status.path)["processes"][0]
        assert row["state"] == "running" and row["pid"] not in (None, first) and row["restarts"] == 1
    finally:
        sup._stop_children(sup.side, 5)
        sup.status.remove()


# -- the API -----------------------------------------------------------------------------------------
@pytest.fixture
def open_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.delenv(STATUS_ENV, raising=False)
    app = create_app(load_settings(None, data_dir=tmp_path, security={"enabled": False}), [])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_without_a_supervisor_this_process_only(open_app: TestClient) -> None:
    r = open_app.get("/v1/system/processes")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "this_process" and "xcstack serve" in body["note"]
    assert body["cpu_count"] == os.cpu_count() and body["worker"]["pid"] == os.getpid()
    (me,) = body["processes"]
    assert me["pid"] == os.getpid() and me["this_worker"] and me["cpus"] == sorted(os.sched_getaffinity(0))
    assert body["supervisor"] is None and body["plan"] is None


def test_the_supervisors_table_with_this_worker_marked(open_app: TestClient, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plan = SimpleNamespace(usable_cpus=[0, 1], http_workers=1, model_workers=1, io_cores=[0], compute_cores=[1])
    w = StatusWriter(tmp_path / "processes.json", plan)
    w.publish([_row(os.getpid(), role="http", kind="http", name="http[0]", cpus=[0], threads=None),
               _row(os.getpid() + 1_000_000), _row(None, kind="llm-worker", name="llm-worker[0]", state="restarting",
                                                    ready=False, restarts=3, last_exit=-9)])
    monkeypatch.setenv(STATUS_ENV, str(w.path))
    contract = Contract(open_app.get("/openapi.json").json())
    body = contract.check(open_app.get("/v1/system/processes"), "get", "/v1/system/processes", 200)
    assert body["source"] == "supervisor" and body["supervisor"]["pid"] == os.getpid()
    assert [(p["name"], p["this_worker"]) for p in body["processes"]] == [
        ("http[0]", True), ("model-worker[0]", False), ("llm-worker[0]", False)]
    assert body["processes"][2]["restarts"] == 3 and body["processes"][2]["pid"] is None
    assert body["plan"]["compute_cores"] == [1] and body["plan"]["event_loop"] == ""  # absent figures: defaults

    for damage in (b"{half a tab", b'{"version": 99}', b'{"version": 1, "processes": [{"pid": "x"}]}'):
        w.path.write_bytes(damage)
        r = open_app.get("/v1/system/processes")
        assert r.status_code == 200 and r.json()["source"] == "this_process", r.text
        assert "could not be read" in r.json()["note"]
    w.path.unlink()
    assert open_app.get("/v1/system/processes").json()["source"] == "this_process"


def test_only_the_sysadmin_reads_the_process_table(data_dir: Path) -> None:
    from tests.security.conftest import audit_records

    settings = load_settings(None, data_dir=data_dir, security={"pbkdf2_iterations": 100_000})
    app = create_app(settings, ["xcstack.security.capability"])
    with TestClient(app, raise_server_exceptions=False) as c:
        svc = next(cap for cap in app.state.xc.capabilities if cap.name == "security").service  # type: ignore[attr-defined]

        async def setup() -> None:
            for name, roles in (("p-sys", ["sysadmin"]), ("p-sec", ["secadmin"]), ("p-aud", ["auditor"]),
                                ("p-none", [])):
                await svc.create_user(SYSTEM, name, roles, kind="service", password=PW)

        assert c.portal is not None
        c.portal.call(setup)
        contract = Contract(c.get("/openapi.json").json())
        op = contract.doc["paths"]["/v1/system/processes"]["get"]
        assert op["x-xc-permission"] == "system:read" and "403" in op["responses"]
        contract.check(c.get("/v1/system/processes"), "get", "/v1/system/processes", 401)
        for who, status in (("p-sys", 200), ("p-sec", 403), ("p-aud", 403), ("p-none", 403)):
            token = c.post("/v1/auth/login", json={"username": who, "password": PW}).json()["token"]
            r = c.get("/v1/system/processes", headers={"Authorization": f"Bearer {token}"})
            body = contract.check(r, "get", "/v1/system/processes", status)  # the answer matches the document
            if status == 403:
                assert body["error"]["code"] == "forbidden", who
            else:
                assert body["source"] == "this_process" and body["processes"][0]["this_worker"]
    denied = [r for r in audit_records(data_dir / "audit") if r.get("outcome") == "denied"
              and r.get("resource") == "system"]
    assert {r["actor"] for r in denied} >= {"p-sec", "p-aud", "p-none"}
