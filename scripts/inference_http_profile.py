#!/usr/bin/env python3
"""Dev-only: where does the http worker spend its CPU per /v1/embeddings request, and how long are the
event-loop iterations when a batch of replies comes back?

Starts one model worker process (pinned to core 1) and, in this process, the real app under uvicorn +
uvloop (pinned to core 0); a load generator in a separate process sends 1-sentence requests at the
given concurrency. Reports CPU time of the http worker per request (thread CPU time of the loop thread:
independent of what else the machine runs), loop-lag p50/p99/max (perf_counter ticker, 10 ms period)
and, with --profile, the top functions by own time (cProfile; it inflates everything ~2x, read shares).

    .venv/bin/python scripts/inference_http_profile.py [--model all-minilm-l6-v2-int8] [-c 64] [-s 5]
        [--profile] [--repo .bench/inference-data/models]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

LOADGEN = textwrap.dedent(
    """
    import asyncio, json, sys, time, aiohttp
    url, model, conc, seconds, fmt = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    WORDS = ("the quick brown fox jumps over a lazy dog while rain falls on the quiet city streets at night "
             "数据 模型 向量 检索").split()
    def sentence(i):
        return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 8))
    async def main():
        lat, n = [], iter(range(10**9))
        stop = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
            async def one():
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    async with s.post(url, json={"input": sentence(next(n)), "model": model,
                                                 "encoding_format": fmt}) as r:
                        await r.read()
                        assert r.status == 200, await r.text()
                    lat.append(time.perf_counter() - t0)
            t0 = time.monotonic()
            await asyncio.gather(*(one() for _ in range(conc)))
            el = time.monotonic() - t0
        lat.sort()
        print(json.dumps({"n": len(lat), "rps": len(lat) / el, "p50_ms": lat[len(lat) // 2] * 1000,
                          "p99_ms": lat[int(len(lat) * 0.99)] * 1000}))
    asyncio.run(main())
    """
)

WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    os.sched_setaffinity(0, {1})
    from xcstack.config import load_settings
    from xcstack.inference.worker import main
    settings = load_settings(data_dir=sys.argv[1], inference={"workers": 1, "mode": "process",
                                                              "model_repository": sys.argv[2],
                                                              "batching": {"max_wait_ms": float(sys.argv[3])}})
    if os.environ.get("XC_INLINE_TOKENS"):  # experiment: the batcher's inline threshold
        import xcstack.inference.core as core
        core.INLINE_TOKENS = int(os.environ["XC_INLINE_TOKENS"])
    if os.environ.get("XC_PROFILE_WORKER"):  # loop thread only (ORT runs in the executor thread)
        import cProfile, pstats
        prof = cProfile.Profile(time.thread_time)
        def dump(*_):
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
            os._exit(0)
        signal.signal(signal.SIGUSR1, dump)
        prof.enable()
    main(settings, 0)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(ROOT / ".bench" / "inference-data" / "models"))
    ap.add_argument("--model", default="all-minilm-l6-v2-int8")
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("-s", "--seconds", type=float, default=5.0)
    ap.add_argument("--format", default="float", choices=["float", "base64"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--loadgen-cpu", type=int, default=None,
                    help="pin the load generator (e.g. 1: with the model worker, so core 0 is the http worker's)")
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() once the app has started")
    ap.add_argument("--max-wait-ms", type=float, default=0.0, help="the worker's batching max_wait_ms")
    ap.add_argument("--profile-worker", action="store_true", help="cProfile the model worker's loop thread")
    ap.add_argument("--budget-ms", type=float, default=None, help="[inference] loop_budget_ms (0 = no pacing)")
    args = ap.parse_args()

    import uvicorn

    from xcstack.app import create_app
    from xcstack.config import load_settings

    data = Path(tempfile.mkdtemp(prefix="xc-prof-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    wenv = {**env, **({"XC_PROFILE_WORKER": "1"} if args.profile_worker else {})}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(data), args.repo, str(args.max_wait_ms)], env=wenv)
    os.sched_setaffinity(0, {0})
    settings = load_settings(data_dir=data, observability={"access_log": False},
                             inference={"workers": 1, "mode": "process", "model_repository": args.repo,
                                        **({} if args.budget_ms is None else {"loop_budget_ms": args.budget_ms})})
    app = create_app(settings, ["xcstack.inference.capability"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                           log_level="warning", access_log=False))
    lags: list[float] = []
    cpu_lags: list[float] = []  # min(wall lag, loop-thread CPU used in the window): the self-inflicted bound
    state: dict[str, float] = {}

    gc_pauses: list[tuple[int, float, float]] = []
    gc_t0: list[float] = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_t0[0], gc_t0[1] = time.perf_counter(), time.thread_time()
        elif state.get("on"):
            gc_pauses.append((info["generation"], time.perf_counter() - gc_t0[0], time.thread_time() - gc_t0[1]))

    import gc

    gc.callbacks.append(on_gc)

    async def ticker() -> None:
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.01)
            if state.get("on"):
                lag = max(0.0, time.perf_counter() - t0 - 0.01)
                lags.append(lag)
                cpu_lags.append(min(lag, time.thread_time() - c0))

    async def serve() -> None:
        asyncio.get_running_loop().create_task(ticker())
        await server.serve()

    th = threading.Thread(target=_run_uvloop, args=(serve,), daemon=True)
    th.start()
    sock = data / "run" / "inference-0.sock"
    deadline = time.monotonic() + 120
    while not (server.started and sock.exists()):
        if time.monotonic() > deadline:
            raise SystemExit("server or worker did not start")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    if args.freeze:
        import gc as _gc

        _gc.collect()
        _gc.freeze()  # start-up objects leave the collector's generations (from another thread: GIL-safe)
    warm = subprocess.run([sys.executable, "-c", LOADGEN, url, args.model, "8", "1", args.format], env=env,
                          capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
    pin = [] if args.loadgen_cpu is None else ["taskset", "-c", str(args.loadgen_cpu)]
    loadgen = subprocess.Popen([*pin, sys.executable, "-c", LOADGEN, url, args.model, str(args.concurrency),
                                str(args.seconds), args.format], env=env, stdout=subprocess.PIPE, text=True)
    state["on"] = 1
    cpu0 = time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)
    wcpu0 = _proc_cpu(worker.pid)
    out, _ = loadgen.communicate()
    cpu = time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID) - cpu0
    wcpu = _proc_cpu(worker.pid) - wcpu0
    state["on"] = 0
    res = json.loads(out.strip().splitlines()[-1])
    lags.sort()
    cpu_lags.sort()

    def q(p: float, v: list[float] = lags) -> float:
        return v[min(len(v) - 1, int(p * len(v)))] * 1000 if v else float("nan")

    res.update({"http_cpu_ms_per_req": cpu * 1000 / max(1, res["n"]),
                "worker_cpu_ms_per_req": wcpu * 1000 / max(1, res["n"]), "lag_p50_ms": q(0.5), "lag_p99_ms": q(0.99),
                "cpu_bound_lag_p99_ms": q(0.99, cpu_lags), "cpu_bound_lag_max_ms": q(1.0, cpu_lags),
                "lag_max_ms": lags[-1] * 1000 if lags else float("nan"), "model": args.model,
                "c": args.concurrency, "format": args.format,
                "budget_ms": settings.inference.loop_budget_ms, "max_wait_ms": args.max_wait_ms})
    by_gen: dict[int, list[tuple[float, float]]] = {}
    for g, d, c in gc_pauses:
        by_gen.setdefault(g, []).append((d * 1000, c * 1000))
    res["gc_pauses_ms"] = {g: {"n": len(v), "max_wall": round(max(x[0] for x in v), 2),
                               "max_cpu": round(max(x[1] for x in v), 2)} for g, v in by_gen.items()}
    if args.freeze:
        res["gc_frozen"] = gc.get_freeze_count()
    res["gc_objects"] = len(gc.get_objects())
    print(json.dumps(res))
    server.should_exit = True
    th.join(10)
    if args.profile and _PROF:
        s = io.StringIO()
        pstats.Stats(_PROF[0], stream=s).sort_stats("tottime").print_stats(35)
        print(s.getvalue())
    if args.profile_worker:
        import signal

        worker.send_signal(signal.SIGUSR1)
    else:
        worker.terminate()
    worker.wait(10)
    return 0


_PROF: list[cProfile.Profile] = []


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_uvloop(coro_fn) -> None:  # type: ignore[no-untyped-def]
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    if "--profile" in sys.argv:
        p = cProfile.Profile(time.thread_time)  # CPU time: preemption on the shared cores is not charged
        _PROF.append(p)
        p.enable()
    try:
        loop.run_until_complete(coro_fn())
    finally:
        if _PROF:
            _PROF[0].disable()


if __name__ == "__main__":
    sys.exit(main())
