"""Content-safety benchmark (issue 19): `python bench/safety.py [--seconds 3]`.

1. scan throughput: a generated 10,000-word list (Chinese and Latin words) plus every
   personal-information detector over ~4 MB of mixed text, MB/s of CPU time (one core);
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

CRYPTO_CAP = "xcstack.crypto.capability"

BASE = ("今天天气很好，我们去公园散步吧。客服电话见官网，订单已发货，请注意查收。"
        "The quick brown fox jumps over the lazy dog; version 2.4.1 released on 2024-05-01. ")


PROSE = ("今天天气很好，我们去公园散步吧。客服会在工作日回复，订单已发货，请注意查收。"
         "The quick brown fox jumps over the lazy dog. ")


def words(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    out: set[str] = set()
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
    for _ in range(3):  # CPU time of this process: MB/s per core, whatever else the machine runs
        t = time.process_time()
        eng.scan(text, rules)
        best = max(best, mb / (time.process_time() - t))
    # documents of ~2 KB (a typical prompt or answer)
    docs = [text[i:i + 700] for i in range(0, 700 * 2000, 700)]
    t = time.process_time()
    for d in docs:
        eng.scan(d, rules)
    small = sum(len(d.encode()) for d in docs) / 1e6 / (time.process_time() - t)
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


async def load(url: str, seconds: float, conc: int = 32) -> tuple[float, float, int]:
    """(requests/s, p50 latency in ms, requests) of `conc` clients posting short chat prompts for `seconds`."""
    import aiohttp

    body = {"model": "mock-model", "max_tokens": 8,
            "messages": [{"role": "user", "content": "你好，请介绍一下你自己。"}]}
    lat: list[float] = []
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        async def worker() -> None:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                async with s.post(url, json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                lat.append(time.perf_counter() - t0)
        t = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return len(lat) / (time.monotonic() - t), statistics.median(lat) * 1000, len(lat)


GW_HEAD = ('data_dir = "{tmp}"\n[gateway]\n[[gateway.upstreams]]\nname = "m"\n'
           'base_url = "http://127.0.0.1:{mport}/v1"\nmodels = ["mock-model"]\n')
FILTERS = ('[[safety.lists]]\nname = "big"\npath = "{lst}"\ncategory = "bench"\n'
           '[[safety.policies]]\nname = "all"\ninput = ["list:big", "pii"]\n'
           'output = ["list:big", "pii"]\naction = "mask"\n')


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_by_side(configs: dict[str, tuple[str, str]], seconds: float,
                 rounds: int) -> dict[str, list[tuple[float, float, float, float]]]:
    """Start one gateway per config (name -> (TOML after the gateway head, extra capability modules)),
    all at once, then load them in interleaved rounds (A B B A ...: drift on a shared machine falls
    on both alike). Per config and round: (req/s at c=32, p50 ms at c=32, p50 ms of one client alone, the
    gateway process's CPU ms per request at c=32: free of the load generator's share of the two cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "big.txt"
        lst.write_text("\n".join(words(10_000)), encoding="utf-8")
        mport = free_port()
        mock = subprocess.Popen([sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(mport),
                                 "--name", "m", "--models", "mock-model"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs: list[subprocess.Popen[bytes]] = []
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        try:
            wait_port(mport)
            for name, (extra, mods) in configs.items():
                data = Path(tmp) / name
                data.mkdir()
                cfg = data / "gw.toml"
                cfg.write_text(GW_HEAD.format(tmp=data, mport=mport) + extra.format(lst=lst), encoding="utf-8")
                port = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "tests/safety/_serve.py"), str(cfg), str(port), mods],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)}))
                urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
                pids[name] = procs[-1].pid
            for url in urls.values():
                wait_port(int(url.split(":")[2].split("/")[0]))
                asyncio.run(load(url, 0.5))  # warm-up
            out: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in urls}
            names = list(urls)
            for r in range(rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    c0 = cpu_s(pids[name])
                    rps, p50, n = asyncio.run(load(urls[name], seconds))
                    cpu_ms = (cpu_s(pids[name]) - c0) / max(1, n) * 1000
                    alone = asyncio.run(load(urls[name], seconds / 3, conc=1))[1]
                    out[name].append((rps, p50, alone, cpu_ms))
            return out
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            mock.terminate()
            mock.wait(5)


def report_pair(title: str, res: dict[str, list[tuple[float, float, float, float]]], base: str, other: str) -> None:
    med = statistics.median
    ratios = [o[0] / b[0] for b, o in zip(res[base], res[other], strict=True)]
    cpu_b, cpu_o = med(r[3] for r in res[base]), med(r[3] for r in res[other])
    added = [(o[2] - b[2]) * 1000 for b, o in zip(res[base], res[other], strict=True)]
    print(f"{title}:\n  req/s (c=32) {base} {med(r[0] for r in res[base]):.0f}, {other} "
          f"{med(r[0] for r in res[other]):.0f} (medians of {len(ratios)} interleaved rounds); ratio median "
          f"{med(ratios):.2f}, rounds {min(ratios):.2f}..{max(ratios):.2f}\n"
          f"  p50 latency c=32: {base} {med(r[1] for r in res[base]):.2f} ms, "
          f"{other} {med(r[1] for r in res[other]):.2f} ms;"
          f" one client alone: {base} {med(r[2] for r in res[base]):.2f} ms, "
          f"{other} {med(r[2] for r in res[other]):.2f}"
          f" ms (added p50 median {med(added):.0f} us, rounds {min(added):.0f}..{max(added):.0f})\n"
          f"  gateway CPU per request at c=32: {base} {cpu_b:.3f} ms, {other} {cpu_o:.3f} ms (medians); requests "
          f"per CPU-second {other} / {base} = {cpu_b / cpu_o:.2f}")


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


def label_cpu() -> None:
    """CPU per label in this process (crypto in process, soft SM2): 32 answers at once, signed in
    micro-batches vs one signature each; and the wait of a lone label. CPU time is less at the mercy
    of a shared machine than wall time."""
    from xcstack.config import Settings
    from xcstack.crypto.capability import make_client
    from xcstack.safety.label import Labeler

    async def run() -> None:
        with tempfile.TemporaryDirectory() as d:
            client = make_client(Settings.model_validate({"data_dir": d, "crypto": {"access": "direct"}}))
            await client.start()
            await client.create_key("content-label", "sm2")
            for name, batch_max in (("micro-batches", 256), ("one signature each", 1)):
                lab = Labeler(client, "content-label", "p", "s", None, Path(d) / "labels", batch_max)
                await asyncio.gather(*(lab.issue("r", "m") for _ in range(32)))
                c0 = time.process_time()
                for _ in range(20):
                    await asyncio.gather(*(lab.issue("r", "m") for _ in range(32)))
                cpu = (time.process_time() - c0) / 640 * 1e6
                lone = []
                for _ in range(30):
                    t = time.perf_counter()
                    await lab.issue("r", "m")
                    lone.append((time.perf_counter() - t) * 1000)
                print(f"label CPU per answer, 32 at once, {name}: {cpu:.0f} us; a lone label waits "
                      f"p50 {statistics.median(lone):.1f} ms")
            await client.close()

    asyncio.run(run())


def gateway_parts(part: str, seconds: float, rounds: int) -> None:
    if part in ("all", "filter"):
        res = side_by_side({"off": ('[safety]\nenabled = false\n', ""),
                            "on": ('[safety.label]\nenabled = false\n' + FILTERS, "")}, seconds, rounds)
        report_pair("gateway, filtering (10,000 words + PII, in and out; labels off), c=32, short prompts", res,
                    "off", "on")
    if part in ("all", "label"):
        label_cpu()
        crypto = '[crypto]\naccess = "direct"\n'
        res = side_by_side({"off": (crypto + '[safety.label]\nenabled = false\n', CRYPTO_CAP),
                            "batched": (crypto + '[safety.label]\nenabled = true\n', CRYPTO_CAP),
                            "per-answer": (crypto + '[safety.label]\nbatch_max = 1\n', CRYPTO_CAP)},
                           seconds, rounds)
        title = "gateway, labels (no filter policies; crypto in process), c=32, short prompts"
        report_pair(title + ", signed in micro-batches", res, "off", "batched")
        report_pair(title + ", one signature per answer (batch_max = 1)", res, "off", "per-answer")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per round and gateway")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--part", choices=("all", "scan", "filter", "label"), default="all")
    args = ap.parse_args()
    global BASE
    if args.part in ("all", "scan"):
        eng = engine(10_000)
        for name, base in (("prose", PROSE), ("digit-heavy", BASE)):
            BASE = base
            big, small = scan_throughput(eng)
            print(f"scan {name}, 10,000 words + all PII detectors: {big:.1f} MB/s (one 4 MB text), "
                  f"{small:.1f} MB/s (700-char texts)")
        BASE = PROSE
        p50, p99 = stream_chunk(eng)
        print(f"stream: added per 20-char chunk p50 {p50:.1f} us, p99 {p99:.1f} us")
    gateway_parts(args.part, args.seconds, args.rounds)
    if args.part == "all":  # memory last: the peak RSS is then the list's own growth
        mem, took = list_memory(100_000)
        print(f"100,000-word list: +{mem:.0f} MB RSS (peak growth while building), built in {took:.2f} s")


if __name__ == "__main__":
    main()
