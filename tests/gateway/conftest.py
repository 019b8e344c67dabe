"""Gateway test fixtures: mock upstreams (the `xcstack mock-upstream` test double, as real
subprocesses) and the gateway itself (`create_app(settings)` served by uvicorn with uvloop on a
real socket, in a background thread or, where RSS or a restart is measured, a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from xcstack.config import Settings
from xcstack.gateway.settings import GatewaySettings

HERE = Path(__file__).resolve().parent
GATEWAY_CAP = "xcstack.gateway.capability"
MOCK_DEFAULTS: dict[str, Any] = {
    "ttft_s": 0.0, "tokens_per_s": 0.0, "token_bytes": 4, "tokens": 16, "fault": "", "fault_after": 0,
    "fault_times": -1, "api_key": "",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class MockUpstream:
    """A `xcstack mock-upstream` subprocess (the test double)."""

    def __init__(self, name: str, extra: list[str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        cmd = [sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(self.port),
               "--name", name, "--models", "mock-model,other-model", *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    def configure(self, **kw: Any) -> dict[str, Any]:
        return dict(http_json("POST", self.root + "/mock/config", kw))

    def reset(self) -> None:
        http_json("POST", self.root + "/mock/reset", {})
        self.configure(**MOCK_DEFAULTS)

    def stats(self) -> dict[str, Any]:
        return dict(http_json("GET", self.root + "/mock/stats"))

    def last(self) -> dict[str, Any]:
        return dict(http_json("GET", self.root + "/mock/last"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def mocks() -> Iterator[list[MockUpstream]]:
    ms = [MockUpstream(f"m{i}") for i in range(3)]
    yield ms
    for m in ms:
        m.stop()


@pytest.fixture
def mock(mocks: list[MockUpstream]) -> MockUpstream:
    for m in mocks:
        m.reset()
    return mocks[0]


def upstream(m: MockUpstream, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": m.name, "base_url": m.base_url, "models": ["mock-model", "other-model"]}
    cfg.update(kw)
    return cfg


def make_settings(tmp: Path, upstreams: list[dict[str, Any]], **gateway: Any) -> Settings:
    gw = GatewaySettings.model_validate({"upstreams": upstreams, **gateway})
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    return Settings(data_dir=data, gateway=gw)


class GatewayServer:
    """create_app(settings) with only the gateway capability, served by uvicorn (uvloop,
    httptools) on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self, settings: Settings, modules: list[str] | None = None) -> None:
        from xcstack.app import create_app

        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings, capability_modules=modules or [GATEWAY_CAP])
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, loop="none", http="httptools", lifespan="on",
            log_level="warning", access_log=False, timeout_keep_alive=30, backlog=4096,
        ))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="gateway-server")

    def _run(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def capability(self) -> Any:
        return next(c for c in self.app.state.xc.capabilities if c.name == "gateway")

    def cap(self, name: str) -> Any:
        return next(c for c in self.app.state.xc.capabilities if c.name == name)

    @property
    def service(self) -> Any:
        return self.capability.service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def call(self, fn: Any, timeout: float = 10.0) -> Any:
        """Run `fn()` (a coroutine function) on the server's loop and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def wait_idle(self, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.service.in_flight == 0 and all(u.gate.active == 0 for u in self.service.upstreams):
                return 0
            time.sleep(0.02)
        return int(self.service.in_flight)


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    servers: list[GatewayServer] = []

    def make(upstreams: list[dict[str, Any]], **gateway: Any) -> GatewayServer:
        srv = GatewayServer(make_settings(tmp_path, upstreams, **gateway)).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def gateway(gateway_factory: Any, mock: MockUpstream) -> GatewayServer:
    return gateway_factory([upstream(mock, aliases={"mock-alias": "mock-model"})])  # type: ignore[no-any-return]


class GatewayProcess:
    """The gateway in its own process (for RSS and kill/restart tests): tests/gateway/_serve.py."""

    def __init__(self, config: Path, port: int | None = None, server: str = "uvicorn") -> None:
        self.config = config
        self.server = server
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, str(HERE / "_serve.py"), str(self.config), str(self.port), self.server]
        with open(self.config.with_suffix(".log"), "ab") as log:  # a pipe nobody reads could fill up
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        wait_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def write_config(path: Path, data_dir: Path, gateway: dict[str, Any]) -> Path:
    """A TOML config file for a gateway subprocess."""
    lines = [f'data_dir = "{data_dir}"', "", "[gateway]"]
    upstreams = gateway.pop("upstreams", [])
    tables: dict[str, dict[str, Any]] = {}
    for k, v in gateway.items():
        if isinstance(v, dict):
            tables[k] = v
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    for name, table in tables.items():
        lines += ["", f"[gateway.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    for u in upstreams:
        lines += ["", "[[gateway.upstreams]]"]
        for k, v in u.items():
            lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, dict) else
                         f"{k} = {{ {', '.join(f'{json.dumps(a)} = {json.dumps(b)}' for a, b in v.items())} }}")
    path.write_text("\n".join(lines) + "\n")
    return path
