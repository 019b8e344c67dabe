"""The `llm` model worker: `main(settings, index)` is the side-process target the supervisor runs.

It checks the model file (assemble.verify), then starts llama.cpp's own HTTP server through xllamacpp
on 127.0.0.1:<port>, with `slots` parallel slots (continuous batching) of `ctx_size` tokens each, as
many decode threads as it has cores (the supervisor pinned it to the tuning plan's model cores), and
an API key only the supervisor's children know: nothing else on the host reaches the model around the
gateway's authorization, limits and audit. llama.cpp's server runs in threads of this process; the
main thread only waits for SIGTERM and then drains: running generations get `drain_s` to finish
(llama.cpp's `requests_processing` gauge), then the server is destroyed and the process exits.

A state file `<data_dir>/run/llm-<index>.state` says `loading`, `ready <pid> <port>` or
`failed <reason>`: the supervisor's ready check and the capability's readiness read it. A model that
fails its check is not retried in a loop (the process stays up, idle, until stopped): re-hashing a
gigabyte every few seconds would help nobody.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xcstack.llm.assemble import LLMModelError, verify

if TYPE_CHECKING:
    from xcstack.config import Settings

log = logging.getLogger("xcstack.llm")

PORT_ENV = "XC_LLM_PORT"
KEY_ENV = "XC_LLM_KEY"
THREADS_ENV = "XC_LLM_THREADS"  # decode threads the tuning plan gives it (side-process env)
_PROCESSING = re.compile(r"^llamacpp:requests_processing\s+([0-9.]+)", re.M)


def state_path(settings: Settings, index: int = 0) -> Path:
    return settings.data_dir / "run" / f"llm-{index}.state"


def read_state(settings: Settings, index: int = 0) -> str:
    try:
        return state_path(settings, index).read_text().strip()
    except OSError:
        return ""


def _write_state(settings: Settings, index: int, text: str) -> None:
    path = state_path(settings, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def worker_port(settings: Settings) -> int:
    """The port of the worker's HTTP server: `[llm] port`, else the one the supervisor chose."""
    if settings.llm.port:
        return settings.llm.port
    raw = os.environ.get(PORT_ENV, "")
    return int(raw) if raw.isdigit() else 0


def build_params(settings: Settings, weights: Path, port: int, key: str, threads: int) -> Any:
    """xllamacpp's CommonParams for this worker (imported here: the native library loads only in it)."""
    import xllamacpp

    llm = settings.llm
    p = xllamacpp.CommonParams()
    p.model.path = str(weights)
    p.model_alias = {llm.public_name}  # echoed as `model` in the answers
    p.n_parallel = llm.slots
    p.n_ctx = llm.ctx_size * llm.slots  # split evenly: each slot gets ctx_size
    p.cont_batching = True
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.hostnames = ["127.0.0.1"]
    p.port = port
    if key:
        p.api_keys = [key]
    p.n_threads_http = min(256, max(8, 4 * llm.slots + 4))  # one per open connection; more wait in accept
    p.endpoint_metrics = True  # the drain reads requests_processing
    p.endpoint_slots = True
    p.timeout_read = p.timeout_write = int(llm.request_timeout_s) + 5
    p.verbosity = 0 if settings.observability.log_level != "DEBUG" else 3
    return p


def processing(server: Any) -> int:
    """Requests llama.cpp is generating for right now."""
    m = _PROCESSING.search(str(server.handle_metrics()))
    return int(float(m.group(1))) if m else 0


def decode_threads() -> int:
    """The plan's count (XC_LLM_THREADS), else one per core this process may run on."""
    raw = os.environ.get(THREADS_ENV, "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(settings: Settings, index: int) -> None:
    logging.basicConfig(level=settings.observability.log_level, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _write_state(settings, index, "loading")
    server = start(settings, index, stop)
    if server is None:
        stop.wait()
        return
    stop.wait()
    drain(server, settings.llm.drain_s)
    del server
    state_path(settings, index).unlink(missing_ok=True)


def start(settings: Settings, index: int, stop: threading.Event | None = None) -> Any:
    """Verify the model and start the server; None (state `failed ...`) when it cannot."""
    llm = settings.llm
    port = worker_port(settings)
    key = os.environ.get(KEY_ENV, "")
    try:
        weights, record = verify(llm.repository_dir(settings.data_dir), llm.model)
    except LLMModelError as exc:
        log.error("llm worker: model %s refused: %s", llm.model, exc)
        _write_state(settings, index, f"failed {exc}")
        return None
    if not port:
        _write_state(settings, index, "failed no port ([llm] port, or the supervisor's XC_LLM_PORT)")
        return None
    threads = llm.threads or decode_threads()
    t0 = time.monotonic()
    try:
        import xllamacpp

        server = xllamacpp.Server(build_params(settings, weights, port, key, threads))
    except Exception as exc:  # xllamacpp raises RuntimeError for a model it cannot load, a port in use...
        log.error("llm worker: llama.cpp did not start: %s", exc)
        _write_state(settings, index, f"failed llama.cpp did not start: {exc}")
        return None
    if not _healthy(port):
        _write_state(settings, index, f"failed llama.cpp server on port {port} does not answer /health")
        return None
    log.info("llm worker: %s (%s, %s) on 127.0.0.1:%d, %d slots x %d tokens, %d threads, ready in %.1fs",
             llm.public_name, record.get("gguf", {}).get("architecture"), record.get("gguf", {}).get("quantisation"),
             port, llm.slots, llm.ctx_size, threads, time.monotonic() - t0)
    _write_state(settings, index, f"ready {os.getpid()} {port}")
    return server


def _healthy(port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def drain(server: Any, grace_s: float) -> None:
    """SIGTERM: wait (at most grace_s) for running generations to end; the http workers stopped first,
    so nothing new arrives."""
    deadline = time.monotonic() + grace_s
    busy = processing(server)
    if busy:
        log.info("llm worker: draining %d running generations (at most %.0fs)", busy, grace_s)
    while busy and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = processing(server)
    if busy:
        log.warning("llm worker: %d generations still running after %.0fs; stopping anyway", busy, grace_s)
