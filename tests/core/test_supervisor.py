"""The supervisor for real: respawn, graceful drain on SIGTERM, zero-error rolling restart on SIGHUP,
with both http servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.core.served import Served

SERVERS = ["uvicorn", "granian"]


@pytest.fixture
def serve_factory(data_dir: Path) -> Iterator[type[Served]]:
    started: list[Served] = []

    class Tracked(Served):
        def start(self, timeout: float = 90.0) -> Served:
            started.append(self)
            return super().start(timeout)

    yield Tracked
    for s in started:
        s.stop()


def wait_for(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize("server", SERVERS)
def test_killed_worker_is_respawned(serve_factory: type[Served], data_dir: Path, server: str) -> None:
    s = serve_factory(data_dir, workers=2, server=server).start()
    pids = s.worker_pids()
    assert len(pids) == 2
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(s.worker_pids()) == 2 and victim not in s.worker_pids())
    wait_for(lambda: s.status("/healthz") == 200)
    assert all(s.status("/healthz") == 200 for _ in range(20))
    assert any("exited with" in line and "restarting" in line for line in s.output)


async def _slow_requests(base: str, n: int, seconds: float) -> list[int]:
    async with aiohttp.ClientSession() as session:
        async def one() -> int:
            async with session.get(f"{base}/v1/slow", params={"s": str(seconds)}) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True))  # type: ignore[arg-type]


@pytest.mark.parametrize("server", SERVERS)
def test_sigterm_drains_inflight_requests(serve_factory: type[Served], data_dir: Path, server: str) -> None:
    s = serve_factory(data_dir, workers=1, server=server).start()

    async def scenario() -> list[int]:
        task = asyncio.create_task(_slow_requests(s.base, 8, 2.0))
        await asyncio.sleep(0.7)  # all 8 are in flight now
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        statuses = await task
        assert time.monotonic() - t0 < 10
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses == [200] * 8, statuses
    assert s.proc is not None
    assert s.proc.wait(20) == 0
    with pytest.raises(OSError):  # the socket is closed once drained
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()


@pytest.mark.parametrize("server", SERVERS)
def test_sighup_rolling_restart_has_zero_failed_requests(
    serve_factory: type[Served], data_dir: Path, server: str
) -> None:
    s = serve_factory(data_dir, workers=2, server=server).start()
    before = s.worker_pids()

    async def load(stop_after: float) -> tuple[int, list[str]]:
        ok, errors = 0, []
        deadline = time.monotonic() + stop_after
        connector = aiohttp.TCPConnector(force_close=True)  # new connection each request
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker() -> None:
                nonlocal ok
                while time.monotonic() < deadline:
                    try:
                        async with session.get(f"{s.base}/v1/slow", params={"s": "0.05"}) as r:
                            await r.read()
                            if r.status == 200:
                                ok += 1
                            else:
                                errors.append(f"status {r.status}")
                    except Exception as exc:
                        errors.append(repr(exc))

            await asyncio.gather(*(worker() for _ in range(8)))
        return ok, errors

    async def scenario() -> tuple[int, list[str]]:
        task = asyncio.create_task(load(12.0))
        await asyncio.sleep(1.0)
        s.signal(signal.SIGHUP)
        return await task

    ok, errors = asyncio.run(scenario())
    after = s.worker_pids()
    assert errors == [], errors[:5]
    assert ok > 100
    assert len(after) == 2 and not (before & after), "every worker was replaced"
    assert any("reload: done" in line for line in s.output)


def _affinity(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_workers_are_pinned_by_plan_and_config(serve_factory: type[Served], data_dir: Path) -> None:
    s = serve_factory(data_dir, workers=1).start()
    (pid,) = s.worker_pids()
    from xcstack.config import load_settings
    from xcstack.supervisor import derive_layout

    planned = derive_layout(load_settings(server={"workers": 1})).http_cpus[0]
    assert planned, "the plan pins the http worker on a machine with two cores"
    assert _affinity(pid) == ",".join(str(c) for c in planned)
    s.stop()
    s2 = serve_factory(data_dir, workers=1, env={"XC_SERVER__WORKER_CPUS": "[1]"}).start()
    (pid2,) = s2.worker_pids()
    assert _affinity(pid2) == "1"


def test_http_workers_start_after_side_processes_are_ready(serve_factory: type[Served], data_dir: Path) -> None:
    sock = data_dir / "probe-side.sock"
    sock.write_text("stale")  # a stale socket file from an earlier run must not count as ready
    s = serve_factory(data_dir, env={"XC_TEST_SIDE_SOCKET": str(sock)}).start()
    side_up = next(line for line in s.output if "probe-side listening at" in line)
    http_started = next(i for i, line in enumerate(s.output) if "started http[0]" in line)
    assert s.output.index(side_up) < http_started, "".join(s.output[:30])
    # the supervisor's process table: the side process with its core, the http worker; served by the worker
    table = json.loads((data_dir / "processes.json").read_text())
    assert table["supervisor"]["pid"] == s.proc.pid  # type: ignore[union-attr]
    rows = {p["name"]: p for p in table["processes"]}
    assert {"http[0]", "probe-side[0]", "hsm-owner[0]", "milvus-lite[0]"} <= set(rows)  # and the default ones
    assert all(p["pid"] and p["state"] == "running" and p["restarts"] == 0 for p in rows.values()), rows
    side, http = rows["probe-side[0]"], rows["http[0]"]
    assert side["cpus"] == [min(os.sched_getaffinity(0))] and side["ready"] is True and side["state"] == "running"
    assert _affinity(side["pid"]) == str(side["cpus"][0])
    assert http["ready"] is True and {http["pid"]} == s.worker_pids() and http["restarts"] == 0
    with urllib.request.urlopen(s.base + "/v1/system/processes", timeout=5) as r:
        served = json.loads(r.read())
    assert served["source"] == "supervisor" and served["plan"] is not None
    assert [(p["name"], p["this_worker"], p["cpus"]) for p in served["processes"]
            if p["name"] in ("http[0]", "probe-side[0]")] == [
        ("http[0]", True, http["cpus"]), ("probe-side[0]", False, side["cpus"])]
    s.stop()
    assert not (data_dir / "processes.json").exists()  # no table outlives its tree


def test_socket_accepts_ignores_stale_files(tmp_path: Path) -> None:
    from xcstack.ipc.channel import socket_accepts

    stale = tmp_path / "stale.sock"
    stale.write_text("")
    assert not socket_accepts(stale)
    assert not socket_accepts(tmp_path / "absent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "live.sock"))
    listener.listen()
    try:
        assert socket_accepts(tmp_path / "live.sock")
    finally:
        listener.close()


def test_serve_refuses_to_start_when_a_sealed_file_changed(tmp_path: Path, data_dir: Path) -> None:
    import subprocess
    import sys

    from tests.core.served import REPO

    cfg = tmp_path / "xcstack.toml"
    cfg.write_text(f'[security]\ntrust_paths = ["{cfg}"]\ntrust_required = true\n')
    env = {**os.environ, "XC_DATA_DIR": str(data_dir), "XC_CRYPTO__ACCESS": "direct",
           "XC_SERVER__PORT": "0"}
    seal = subprocess.run([sys.executable, "-m", "xcstack", "--config", str(cfg), "trust", "seal"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert seal.returncode == 0, seal.stderr
    cfg.write_text(cfg.read_text() + "# edited after sealing\n")
    serve = subprocess.run([sys.executable, "-m", "xcstack", "--config", str(cfg), "serve"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert serve.returncode != 0
    assert "refusing to start" in serve.stderr and str(cfg) in serve.stderr, serve.stderr[-2000:]
    assert "xcstack ready" not in serve.stdout


def test_sighup_with_a_broken_config_keeps_the_old_workers(
    serve_factory: type[Served], data_dir: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "xcstack.toml"
    cfg.write_text("[observability]\nlog_level = 'INFO'\n")
    s = serve_factory(data_dir, env={"XC_CONFIG": str(cfg)}).start()
    before = s.worker_pids()
    cfg.write_text("[observability]\nlog_level = 'LOUD'\n")
    s.signal(signal.SIGHUP)
    wait_for(lambda: any("reload refused" in line for line in s.output), timeout=15)
    assert any("observability.log_level" in line for line in s.output if "reload refused" in line)
    assert s.worker_pids() == before
    assert s.status("/healthz") == 200
