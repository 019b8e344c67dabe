"""Run `xcstack serve` for real (a subprocess on a free port) for supervisor and end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


class Served:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, workers: int = 1,
                 server: str = "uvicorn", plugins: str = '["tests.core.probe_capability"]') -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "XC_DATA_DIR": str(data_dir),
            "XC_SERVER__PORT": str(self.port),
            "XC_SERVER__WORKERS": str(workers),
            "XC_SERVER__HTTP_SERVER": server,
            "XC_SERVER__PLUGINS": plugins,
            "XC_SERVER__GRACEFUL_TIMEOUT_S": "15",
            "XC_SECURITY__ENABLED": "false",
            "XC_OBSERVABILITY__ACCESS_LOG": "false",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 90.0) -> Served:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xcstack", "serve"], env=self.env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._drain_output, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("xcstack serve exited:\n" + "".join(self.output[-50:]))
            if any("xcstack ready" in line for line in self.output) and self.status("/healthz") == 200:
                return self
            time.sleep(0.1)
        raise TimeoutError("xcstack serve did not become ready:\n" + "".join(self.output[-50:]))

    def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "xcstack.worker --fd"],
                             capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)
