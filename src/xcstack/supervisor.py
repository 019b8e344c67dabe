"""`xcstack serve`: the process tree of docs/architecture.md §1.

The supervisor owns no request. It binds the one listening socket, starts W http workers that
inherit it, starts the side processes capabilities declare (model workers, the HSM owner), and:
- restarts a dead child with exponential backoff (reset after it has run a while);
- on SIGTERM/SIGINT drains: workers stop accepting and finish in-flight requests within the grace
  period, then side processes stop;
- on SIGHUP restarts http workers one at a time: a new worker must report ready before the old one
  is asked to drain, so the shared socket always has a live acceptor (zero failed requests);
- publishes the process table (pids, cores, restarts, readiness) on every change, for
  `GET /v1/system/processes` in any http worker (system/table.py).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcstack.capability import CAPABILITY_MODULES, SideProcessSpec
from xcstack.config import ConfigError, Settings, load_settings
from xcstack.observability.logs import setup_logging
from xcstack.system.table import STATUS_ENV, StatusWriter, planned_threads, status_path

log = logging.getLogger("xcstack.supervisor")

READY_TIMEOUT_S = 120.0
SIDE_READY_TIMEOUT_S = 120.0
STABLE_AFTER_S = 10.0
TICK_S = 0.05
SIDE_CHECK_S = 0.5  # how often a running side process that is not ready yet is checked again


@dataclass
class Layout:
    """How many http workers, and the cores of each process (from the tuning plan or config)."""

    http_workers: int
    http_cpus: list[list[int]]
    plan: Any = None
    notes: list[str] = field(default_factory=list)


def derive_layout(settings: Settings) -> Layout:
    """The tuning plan from the platform probe, with config overrides applied."""
    srv = settings.server
    plan: Any = None
    try:
        from xcstack.platform.plan import derive_plan
        from xcstack.platform.probe import probe

        plan = derive_plan(probe(), settings)
    except ImportError:
        plan = None
    workers = srv.workers or (getattr(plan, "http_workers", None) if plan is not None else None) or 1
    cpus: list[list[int]] = []
    if srv.pin_cpus:
        if srv.worker_cpus:
            cpus = [[c] for c in srv.worker_cpus]
        elif plan is not None and getattr(plan, "http_cpus", None):
            cpus = [list(c) if isinstance(c, (list, tuple)) else [int(c)] for c in plan.http_cpus]
    http_cpus = [cpus[i % len(cpus)] for i in range(workers)] if cpus else [[] for _ in range(workers)]
    return Layout(workers, http_cpus, plan)


def collect_side_processes(settings: Settings, plan: Any, modules: Sequence[str]) -> list[SideProcessSpec]:
    specs: list[SideProcessSpec] = []
    for name in modules:
        module = importlib.import_module(name)
        hook = getattr(module, "side_processes", None)
        if hook is not None:
            specs.extend(hook(settings, plan))
    return specs


def collect_child_env(settings: Settings, plan: Any, modules: Sequence[str]) -> dict[str, str]:
    """What the capabilities' `child_env(settings, plan)` hooks tell every child (http workers and side
    processes alike), e.g. the model-worker count: passed in each child's environment, never written
    into this process's own."""
    env: dict[str, str] = {}
    for name in modules:
        hook = getattr(importlib.import_module(name), "child_env", None)
        if hook is not None:
            env.update(hook(settings, plan))
    return env


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Linux hands TCP_NODELAY on to every accepted socket: Granian never sets it itself, and without it
    # the first SSE event on a reused keep-alive connection waited ~40 ms (Nagle + delayed ACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


@dataclass
class Child:
    kind: str  # "http" or the side process name
    index: int
    argv: list[str]
    cpus: Sequence[int] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    ready_r: int | None = None
    ready: bool = False
    ready_check: Any = None  # side processes: callable(index) -> bool
    # for the process table (system/table.py)
    threads: int | None = None
    started_at: float = 0.0  # wall clock of the last start
    restarts: int = 0
    last_exit: int | None = None
    checked_at: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.index}]"

    def status(self) -> dict[str, Any]:
        """This child's row of the process table (system/protocol.py ProcessEntry)."""
        alive = self.proc is not None
        return {"role": "http" if self.kind == "http" else "side", "kind": self.kind, "name": self.label,
                "index": self.index, "pid": self.proc.pid if self.proc is not None else None, "cpus": list(self.cpus),
                "threads": self.threads, "started_at": self.started_at or None, "restarts": self.restarts,
                "ready": self.ready if self.kind == "http" or self.ready_check is not None else None,
                "last_exit": self.last_exit,
                "state": "running" if alive else "restarting" if self.restart_at is not None
                else "stopped" if self.started_at else "starting"}


class Supervisor:
    def __init__(self, settings: Settings, modules: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.modules = list([*CAPABILITY_MODULES, *settings.server.plugins] if modules is None else modules)
        self.layout = derive_layout(settings)
        self.sock: socket.socket | None = None
        self.http: list[Child] = []
        self.side: list[Child] = []
        self.stopping = False
        self.reload_requested = False
        self.status = StatusWriter(status_path(settings.data_dir.resolve()), self.layout.plan)

    def _publish(self) -> None:
        """Write the process table (on every spawn, death and readiness change)."""
        self.status.publish([c.status() for c in [*self.http, *self.side]])

    # -- process management ----------------------------------------------------------------
    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **child.env, STATUS_ENV: str(self.status.path)}
        if child.cpus:
            env["XC_WORKER_CPUS"] = ",".join(str(c) for c in child.cpus)
        pass_fds: list[int] = []
        argv = list(child.argv)
        if child.kind == "http":
            assert self.sock is not None
            r, w = os.pipe()
            child.ready_r, child.ready = r, False
            pass_fds = [self.sock.fileno(), w]
            argv += ["--fd", str(self.sock.fileno()), "--ready-fd", str(w)]
        child.proc = subprocess.Popen(argv, env=env, pass_fds=pass_fds, close_fds=True)
        child.started = time.monotonic()
        child.started_at = time.time()
        child.restart_at = None
        if child.kind == "http":
            os.close(pass_fds[1])
            os.set_blocking(child.ready_r, False)  # type: ignore[arg-type]
        log.info("started %s pid=%d cpus=%s", child.label, child.proc.pid, list(child.cpus))
        self._publish()

    def _poll_ready(self, child: Child) -> bool:
        if child.ready or child.ready_r is None:
            return child.ready
        try:
            data = os.read(child.ready_r, 1)
        except BlockingIOError:
            return False
        os.close(child.ready_r)
        child.ready_r = None
        child.ready = data == b"R"
        if child.ready:
            self._publish()
        return child.ready

    def _check_side(self, child: Child) -> bool:
        """A side process's readiness check; a change is published."""
        child.checked_at = time.monotonic()
        ok = bool(child.ready_check(child.index))
        if ok != child.ready:
            child.ready = ok
            self._publish()
        return ok

    def _reap(self, child: Child) -> None:
        """A child died on its own: schedule its restart with backoff."""
        assert child.proc is not None
        from xcstack.observability.metrics import CHILD_RESTARTS, mark_process_dead

        code = child.proc.returncode
        mark_process_dead(child.proc.pid)
        if child.ready_r is not None:
            os.close(child.ready_r)
            child.ready_r = None
        ran = time.monotonic() - child.started
        child.failures = 0 if ran > STABLE_AFTER_S else child.failures + 1
        delay = min(self.settings.server.respawn_backoff_max_s, 0.1 * (2 ** child.failures)) if child.failures else 0.0
        child.restart_at = time.monotonic() + delay
        child.proc = None
        child.ready, child.restarts, child.last_exit = False, child.restarts + 1, code
        self._publish()
        CHILD_RESTARTS.labels(child.kind).inc()
        log.warning("%s exited with %s after %.1fs; restarting in %.2fs", child.label, code, ran, delay)

    def _tick(self) -> None:
        now = time.monotonic()
        for child in [*self.side, *self.http]:
            if child.proc is not None and child.proc.poll() is not None:
                self._reap(child)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
            if child.kind == "http" and child.proc is not None:
                self._poll_ready(child)
            elif (child.proc is not None and not child.ready and child.ready_check is not None
                  and now - child.checked_at >= SIDE_CHECK_S):
                self._check_side(child)

    def _wait_ready(self, child: Child, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            if self._poll_ready(child):
                return True
            if child.proc is None or child.proc.poll() is not None:
                return False
            time.sleep(TICK_S)
        return child.ready

    def _wait_side_ready(self, timeout: float) -> None:
        """Let side processes (HSM owner, model workers) come up before http workers take traffic."""
        waiting = [c for c in self.side if c.ready_check is not None]
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline and not self.stopping:
            self._tick()  # a side process that dies while starting is restarted
            waiting = [c for c in waiting if not self._check_side(c)]
            time.sleep(TICK_S)
        for c in waiting:
            log.warning("%s not ready after %.0fs; starting http workers anyway (its calls fail with 503)",
                        c.label, timeout)

    def _stop_children(self, children: list[Child], grace: float) -> None:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0fs; killing it", child.label, grace)
                child.proc.kill()
                child.proc.wait()
            from xcstack.observability.metrics import mark_process_dead

            mark_process_dead(child.proc.pid)
            if child.ready_r is not None:
                os.close(child.ready_r)
                child.ready_r = None

    def _rolling_restart(self) -> None:
        """SIGHUP: replace every http worker, one at a time, never leaving the socket unserved."""
        try:  # the new workers read the config again: refuse a reload that would not start
            load_settings()
        except ConfigError as exc:
            log.error("reload refused, the workers keep running on the old config: %s", exc)
            return
        log.info("reload: rolling restart of %d http workers", len(self.http))
        for i, old in enumerate(list(self.http)):
            if self.stopping:
                return
            new = Child("http", old.index, old.argv, old.cpus, old.env, restarts=old.restarts)
            self._spawn(new)
            if not self._wait_ready(new, READY_TIMEOUT_S):
                log.error("reload: new %s did not become ready; keeping the old one", new.label)
                self._stop_children([new], 1.0)
                continue
            self.http[i] = new
            self._publish()
            self._stop_children([old], self.settings.server.graceful_timeout_s)
        log.info("reload: done")

    # -- main loop -----------------------------------------------------------------------------
    def plan_children(self) -> None:
        """The side processes the capabilities declare and the http workers, each with the variables
        of the capabilities' `child_env` hooks in its environment (none is set in this process)."""
        srv = self.settings.server
        worker_argv = [sys.executable, "-m", "xcstack.worker"]
        shared = collect_child_env(self.settings, self.layout.plan, self.modules)
        for spec in collect_side_processes(self.settings, self.layout.plan, self.modules):
            for i in range(spec.instances):
                cpus = list(spec.cpus[i]) if i < len(spec.cpus) and srv.pin_cpus else []
                argv = [*worker_argv, "--side", spec.target, "--index", str(i)]
                self.side.append(Child(spec.name, i, argv, cpus, {**shared, **spec.env},
                                       ready_check=spec.ready_check,
                                       threads=planned_threads(spec.name, cpus, spec.env)))
        for i in range(self.layout.http_workers):
            self.http.append(Child("http", i, worker_argv, self.layout.http_cpus[i], dict(shared)))

    def run(self) -> int:
        srv = self.settings.server
        self.sock = bind_socket(srv.host, srv.port, srv.backlog)
        host, port = self.sock.getsockname()[:2]
        self.plan_children()

        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

        for child in self.side:
            self._spawn(child)
        self._wait_side_ready(SIDE_READY_TIMEOUT_S)
        for child in self.http:
            self._spawn(child)
        announced = False
        try:
            while not self.stopping:
                if not announced and all(c.ready for c in self.http):
                    print_banner(self.settings, host, port, len(self.http), len(self.side))
                    announced = True
                if self.reload_requested:
                    self.reload_requested = False
                    self._rolling_restart()
                self._tick()
                time.sleep(TICK_S)
        finally:
            log.info("draining: stopping %d http workers (grace %.0fs)", len(self.http), srv.graceful_timeout_s)
            self.sock.close()
            self._stop_children(self.http, srv.graceful_timeout_s)
            self._stop_children(self.side, srv.graceful_timeout_s)
            self.status.remove()
            log.info("stopped")
        return 0

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_reload(self, signum: int, frame: Any) -> None:
        self.reload_requested = True


def prepare_metrics_dir(data_dir: Path) -> None:
    mdir = data_dir / "metrics"
    shutil.rmtree(mdir, ignore_errors=True)
    mdir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mdir.resolve())


def print_banner(settings: Settings, host: str, port: int, workers: int, sides: int) -> None:
    base = f"http://{host}:{port}"
    if settings.security.enabled:
        auth = [
            f"  authenticate: curl -X POST {base}/v1/auth/login -d '{{\"username\": ..., \"password\": ...}}'",
            "    -> a bearer token; send 'Authorization: Bearer <token>' on every other call.",
            "    First start: the one-time admin passwords are printed above (change them at first login);",
            "    machine clients use API keys: `xcstack user --help`.",
        ]
    else:
        auth = ["  authenticate: security is DISABLED ([security] enabled = false): every endpoint is open"]
    lines = [
        f"xcstack ready: listening on {base} "
        f"({workers} http worker{'s' if workers != 1 else ''}, {sides} side process{'es' if sides != 1 else ''})",
        f"  health: {base}/healthz   ready: {base}/readyz   metrics: {base}/metrics",
        *auth,
    ]
    print("\n".join(lines), flush=True)


def serve(settings: Settings) -> int:
    setup_logging(settings.observability.log_level, settings.observability.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prepare_metrics_dir(settings.data_dir)  # before prometheus_client is imported anywhere here
    if settings.security.enabled:  # 可信验证: refuse to start on any mismatch of the sealed manifest
        from xcstack.security.trust import verify_or_refuse

        verify_or_refuse(settings)
    return Supervisor(settings).run()
