"""The model worker process: `main(settings, index)` is the side-process target the supervisor runs.

One process per core slot, pinned; ONNX Runtime single-threaded (OMP_NUM_THREADS=1, intra/inter 1,
no spinning); the models assigned to this index are loaded and warmed once, then served over a
Unix socket (`<socket_dir>/inference-<index>.sock`) with the xcstack IPC framing. SIGTERM stops it:
the socket closes first (callers fail fast with a retriable error), queued work is failed, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xcstack.config import Settings

log = logging.getLogger("xcstack.inference")

WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAYON_NUM_THREADS": "1",
}


def socket_path(settings: Settings, index: int) -> Path:
    return settings.inference.sockets_dir(settings.data_dir) / f"inference-{index}.sock"


def current_plan(settings: Settings) -> Any:
    """The tuning plan (probe + config overrides), the same one the supervisor derives; None if unavailable."""
    try:
        from xcstack.platform.plan import derive_plan
        from xcstack.platform.planning.overrides import PlanOverrides
        from xcstack.platform.probe import probe

        return derive_plan(probe(), PlanOverrides.from_settings(settings))
    except Exception as exc:  # the probe is best effort; config or defaults decide then
        log.debug("no tuning plan: %r", exc)
        return None


# Set by `side_processes` in the supervisor and inherited by every child: pinned children would
# otherwise re-derive the plan from their own (narrower) CPU affinity and disagree on the count.
COUNT_ENV = "XC_INFERENCE_MODEL_WORKERS"


def worker_count(settings: Settings, plan: Any = None) -> int:
    """Model workers: [inference] workers / worker_cpus, else the count the supervisor published, else
    the tuning plan, else cores - 1 (>= 1).

    0 means the plan leaves no model workers: the http workers then run models inline."""
    inf = settings.inference
    if inf.workers is not None:
        return inf.workers
    if inf.worker_cpus is not None:
        return len(inf.worker_cpus)
    published = os.environ.get(COUNT_ENV, "")
    if published.isdigit():
        return int(published)
    n = getattr(plan, "model_workers", None)
    if isinstance(n, int) and n >= 0:
        return n
    return max(1, (os.cpu_count() or 2) - 1)


def count_known(settings: Settings) -> bool:
    inf = settings.inference
    return inf.workers is not None or inf.worker_cpus is not None or os.environ.get(COUNT_ENV, "").isdigit()


def worker_cpus(settings: Settings, plan: Any = None) -> list[list[int]]:
    """The cores of each model worker ([] = not pinned)."""
    if settings.inference.worker_cpus is not None:
        return [list(c) for c in settings.inference.worker_cpus]
    cpus = getattr(plan, "model_cpus", None)
    if isinstance(cpus, list) and cpus and getattr(plan, "pin", True):
        return [list(c) if isinstance(c, (list, tuple)) else [int(c)] for c in cpus]
    return []


def main(settings: Settings, index: int) -> None:
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    cpus = [] if os.environ.get("XC_WORKER_CPUS") else worker_cpus(settings)  # the supervisor pinned us
    if cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus[index % len(cpus)])
    logging.basicConfig(level=settings.observability.log_level, format="%(asctime)s %(name)s %(message)s")
    from xcstack.inference.runtime import configure_malloc

    configure_malloc()  # before any thread allocates: one malloc arena for the loop and executor threads
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(settings, index))


def settle_heap() -> None:
    """After the models are loaded and warmed: give back what parsing them left on the heap (e5 int8: 17 MB)
    and move what lives as long as the process (ORT sessions, tokenizer tables) out of the GC's reach. A
    full collection over them took ~40 ms with e5 loaded: a c=1 request that met one waited for it (c=1 p99
    34.7 -> 26.0 ms, bench/embeddings.py e5), as build_worker_app already avoids for the http workers."""
    from xcstack.inference.runtime import release_freed_memory

    release_freed_memory()
    gc.collect()
    gc.freeze()


async def serve(
    settings: Settings, index: int, stop: asyncio.Event | None = None, total: int | None = None
) -> None:
    from xcstack.inference.core import WorkerCore
    from xcstack.inference.repository import ModelRepository
    from xcstack.ipc.channel import IPCServer

    repo = ModelRepository(settings.inference.repository_dir(settings.data_dir)).scan()
    if total is None:
        total = worker_count(settings, None if count_known(settings) else current_plan(settings))
    core = WorkerCore(repo, settings.inference, worker_index=index, total_workers=max(1, total))
    core.load()  # load + warm once, before the socket exists: callers see "unavailable" until ready
    settle_heap()
    core.start()
    path = socket_path(settings, index)
    server = IPCServer(path, core.handle)
    await server.start()
    log.info("model worker %d serving %s on %s", index, sorted(core.models), path)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        # drain: new calls are refused as retriable (the http side tries another worker), work already
        # queued finishes within the grace period, then the socket closes
        drained = await core.drain(min(settings.server.graceful_timeout_s, settings.inference.request_timeout_s))
        log.info("model worker %d stopping (%s)", index, "drained" if drained else "grace period over")
    finally:
        await server.close()
        await core.close()
