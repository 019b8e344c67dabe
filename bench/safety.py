"""Content-safety benchmark (issue 19): `python bench/safety.py [--seconds 3]`.

1. scan throughput: a generated 10,000-word list (Chinese and Latin words) plus every
   personal-information detector over ~4 MB of mixed text, MB/s on one core;
2. streaming: added time per 20-character chunk (`TextFilter.push`), p50 and p99;
3. gateway requests/s, filtering on (10,000-word list + all PII detectors on input and output,
   labels off) vs off, short non-streamed prompts, concurrency 32, one gateway process, mock upstream;
4. memory of a loaded 100,000-word list (RSS growth of this process).
The lists are generated here (nothing big is committed). The machine is shared: read ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xcstack.safety.engine import ContentSafety  # noqa: E402
from xcstack.safety.keywords import Keywords  # noqa: E402
from xcstack.safety.settings import SafetySettings  # noqa: E402
from xcstack.safety.stream import TextFilter  # noqa: E402

BASE = ("今天天气很好，我们去公园散步吧。客服电话见官网，订单已发货，请注意查收。"
        "The quick brown fox jumps over the lazy dog; version 2.4.1 released on 2024-05-01. ")


PROSE = "今天天气很好，我们去公园散步吧。客服会在工作日回复，订单已发货，请注意查收。The quick brown fox jumps over the lazy dog. "


def words(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    out = set()
    while len(out) < n:
        if rnd.random() < 0.8:
            out.add("".join(chr(rnd.randint(0x4E00, 0x9FA5)) for _ in range(rnd.randint(2, 6))))
        else:
            out.add("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(5, 10))))
    return sorted(out)


def engine(n_words: int) -> ContentSafety:
    s = SafetySettings.model_validate({
        "lists": [{"name": "big", "path": "/dev/null", "category": "bench"}],
        "policies": [{"name": "all", "input": ["list:big", "pii"], "output": ["list:big", "pii"], "action": "mask"}]})
    return ContentSafety(s, Keywords([("big", "bench", "\n".join(words(n_words)).encode())]))


def scan_throughput(eng: ContentSafety) -> tuple[float, float]:
    rules = eng.plan("k", (), "m", "/v1/chat/completions").input  # type: ignore[union-attr]
    assert rules is not None
    text = BASE * (4_000_000 // len(BASE.encode()))
    mb = len(text.encode()) / 1e6
    eng.scan(text[:10000], rules)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        eng.scan(text, rules)
        best = max(best, mb / (time.perf_counter() - t))
    # documents of ~2 KB (a typical prompt or answer)
    docs = [text[i:i + 700] for i in range(0, 700 * 2000, 700)]
    t = time.perf_counter()
    for d in docs:
        eng.scan(d, rules)
    small = sum(len(d.encode()) for d in docs) / 1e6 / (time.perf_counter() - t)
    return best, small


def stream_chunk(eng: ContentSafety) -> tuple[float, float]:
    rules = eng.plan("k", (), "m", "/v1/chat/completions").output  # type: ignore[union-attr]
    assert rules is not None
    text = BASE * 200
    chunks = [text[i:i + 20] for i in range(0, len(text), 20)]
    found: list = []
    times: list[float] = []
    for _ in range(3):
        tf = TextFilter(eng, rules)
        for c in chunks:
            t = time.perf_counter_ns()
            tf.push(c, found)
            times.append((time.perf_counter_ns() - t) / 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


async def load(url: str, seconds: float, conc: int = 32) -> float:
    import aiohttp

    body = {"model": "mock-model", "max_tokens": 8, "messages": [{"role": "user", "content": "你好，请介绍一下你自己。"}]}
    done = 0
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with s.post(url, json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                done += 1
        t = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return done / (time.monotonic() - t)


def gateway_rps(seconds: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "big.txt"
        lst.write_text("\n".join(words(10_000)), encoding="utf-8")
        mport = free_port()
        mock = subprocess.Popen([sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(mport),
                                 "--name", "m", "--models", "mock-model"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        out = []
        try:
            wait_port(mport)
            for on in (False, True):
                cfg = Path(tmp) / f"gw-{on}.toml"
                text = (f'data_dir = "{tmp}"\n[gateway]\n[[gateway.upstreams]]\nname = "m"\n'
                        f'base_url = "http://127.0.0.1:{mport}/v1"\nmodels = ["mock-model"]\n'
                        f'[safety]\nenabled = {"true" if on else "false"}\n[safety.label]\nenabled = false\n')
                if on:
                    text += (f'[[safety.lists]]\nname = "big"\npath = "{lst}"\ncategory = "bench"\n'
                             '[[safety.policies]]\nname = "all"\ninput = ["list:big", "pii"]\n'
                             'output = ["list:big", "pii"]\naction = "mask"\n')
                cfg.write_text(text, encoding="utf-8")
                port = free_port()
                gw = subprocess.Popen([sys.executable, str(ROOT / "tests/safety/_serve.py"), str(cfg), str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                try:
                    wait_port(port)
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    asyncio.run(load(url, 1.0))  # warm-up
                    out.append(asyncio.run(load(url, seconds)))
                finally:
                    gw.send_signal(signal.SIGINT)
                    gw.wait(10)
        finally:
            mock.terminate()
            mock.wait(5)
        return out[0], out[1]


def list_memory(n: int) -> tuple[float, float]:
    gc.collect()
    before = _rss()
    t = time.perf_counter()
    kw = Keywords([("big", "bench", "\n".join(words(n, seed=11)).encode())])
    took = time.perf_counter() - t
    gc.collect()
    del kw  # measured while alive above
    return (_peak_growth(before)), took


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_growth(before: int) -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (max(peak, _rss()) - before) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    global BASE
    eng = engine(10_000)
    for name, base in (("prose", PROSE), ("digit-heavy", BASE)):
        BASE = base
        big, small = scan_throughput(eng)
        print(f"scan {name}, 10,000 words + all PII detectors: {big:.1f} MB/s (one 4 MB text), "
              f"{small:.1f} MB/s (700-char texts)")
    BASE = PROSE
    p50, p99 = stream_chunk(eng)
    print(f"stream: added per 20-char chunk p50 {p50:.1f} us, p99 {p99:.1f} us")
    off, on = gateway_rps(args.seconds)
    print(f"gateway req/s (c=32, short prompts): off {off:.0f}, on {on:.0f}, ratio {on / off:.2f}")
    # memory last: the peak RSS is then the list's own growth
    mem, took = list_memory(100_000)
    print(f"100,000-word list: +{mem:.0f} MB RSS (peak growth while building), built in {took:.2f} s")


if __name__ == "__main__":
    main()
