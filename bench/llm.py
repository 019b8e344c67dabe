"""Local chat model benchmark: xcstack's gateway in front of its llama.cpp worker vs the same worker's own
HTTP server called directly (the peer: xllamacpp's server, same process, model, slots and threads).

`xcstack serve` runs as in production (supervisor, one http worker, the llm worker with 8 slots;
security, inference and vectors off so the figures are the relay's). Each point streams `--tokens`
tokens per request (temperature 0, the same short prompt: llama.cpp's prompt cache makes TTFT one
decode step) from c concurrent clients, `--rounds` rounds, direct and via xcstack interleaved.
Reports aggregate decode tokens/s at c=1, 4, 8 and the ratio xcstack/direct, the TTFT xcstack adds
(p50), c=4 vs c=1 scaling, the worker's RSS, and the http worker's RSS and event-loop lag p99 while 8
streams run. Writes its section of docs/benchmarks.md.

    .venv/bin/python bench/llm.py [--tokens 16] [--rounds 2] [--repo DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import table, write_section  # noqa: E402
from tests.core.served import Served  # noqa: E402

from xcstack.llm.assemble import BUILTINS, assemble, is_current  # noqa: E402
from xcstack.llm.settings import DEFAULT_MODEL  # noqa: E402

PROMPT = "Count from 1 to 100, separated by commas."


def child_pids(served: Served, pattern: str) -> list[int]:
    assert served.proc is not None
    out = subprocess.run(["pgrep", "-P", str(served.proc.pid), "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lag_buckets(base: str) -> dict[float, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("xc_event_loop_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = out.get(float(le) if le != "+Inf" else float("inf"),
                                                                        0.0) + float(line.rsplit(" ", 1)[1])
    return out


def p99(before: dict[float, float], after: dict[float, float]) -> float:
    diff = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = diff[-1][1] if diff else 0
    for le, n in diff:
        if total and n >= 0.99 * total:
            return le
    return float("nan")


async def one(session: aiohttp.ClientSession, url: str, headers: dict[str, str], tokens: int) -> tuple[float, int]:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft = 0.0
    n = 0
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content":"' in line:
                if not n:
                    ttft = time.perf_counter() - t0
                n += 1
    return ttft, n


async def point(url: str, headers: dict[str, str], c: int, tokens: int) -> tuple[float, list[float]]:
    """Aggregate content tokens/s of c concurrent streams (each one request), and their TTFTs."""
    # a fresh connection per request for both targets: llama.cpp's server closes idle keep-alive connections
    # after a few seconds, and a reused one that it closed fails with ServerDisconnected
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        await one(s, url, headers, 2)  # warm: connection and prompt cache
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(s, url, headers, tokens) for _ in range(c)))
        wall = time.perf_counter() - t0
    return sum(n for _, n in res) / wall, [t for t, _ in res]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repo", help="an LLM repository holding the default model (else assembled into a temp dir)")
    ap.add_argument("--ttft-samples", type=int, default=60,
                    help="one-token streams per target, interleaved, for the TTFT the relay adds")
    args = ap.parse_args()
    model = BUILTINS[DEFAULT_MODEL]
    tmp = Path(tempfile.mkdtemp(prefix="xc-bench-llm-"))
    repo = Path(args.repo) if args.repo and is_current(Path(args.repo), DEFAULT_MODEL, model.sha256) else tmp / "repo"
    if repo == tmp / "repo":
        assemble(model, repo)
    served = Served(tmp / "data", plugins="[]", env={
        "XC_LLM__REPOSITORY": str(repo), "XC_LLM__SLOTS": "8", "XC_LLM__CTX_SIZE": "512",
        "XC_INFERENCE__ENABLED": "false", "XC_VECTOR__ENABLED": "false", "XC_CRYPTO__ENABLED": "false",
        "XC_GATEWAY__QUEUE_TIMEOUT_S": "300"})
    served.start(timeout=300)
    try:
        [llm] = child_pids(served, "xcstack.llm.worker:main")
        [http] = child_pids(served, "xcstack.worker --fd")
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{llm}/environ").read_text().split("\0") if "=" in kv)
        direct = (f"http://127.0.0.1:{env['XC_LLM_PORT']}/v1/chat/completions",
                  {"Authorization": f"Bearer {env['XC_LLM_KEY']}"})
        via = (served.base + "/v1/chat/completions", {})
        threads = len(os.sched_getaffinity(llm))
        results: dict[tuple[str, int], list[float]] = {}
        ttfts: dict[str, list[float]] = {"direct": [], "xcstack": []}
        lag = float("nan")
        for c in (1, 4, 8):
            for _ in range(args.rounds):
                for name, (url, headers) in (("direct", direct), ("xcstack", via)):
                    before = lag_buckets(served.base) if name == "xcstack" and c == 8 else None
                    tps, tt = asyncio.run(point(url, headers, c, args.tokens))
                    if before is not None:
                        lag = max(lag, p99(before, lag_buckets(served.base))) if lag == lag else \
                            p99(before, lag_buckets(served.base))
                    results.setdefault((name, c), []).append(tps)
                    if c == 1:
                        ttfts[name] += tt
            print(c, {k: [round(x, 2) for x in v] for k, v in results.items() if k[1] == c}, flush=True)
        # TTFT at c=1 from many one-token streams, direct and via xcstack alternating: a decode step varies by
        # more than the relay costs, so the few streams of the throughput points cannot resolve it
        for _ in range(args.ttft_samples):
            for name, (url, headers) in (("direct", direct), ("xcstack", via)):
                ttfts[name] += asyncio.run(point(url, headers, 1, 1))[1]
        load = os.getloadavg()[0]
        rows = []
        for c in (1, 4, 8):
            d, x = statistics.mean(results[("direct", c)]), statistics.mean(results[("xcstack", c)])
            rows.append([c, f"{d:.2f}", f"{x:.2f}", f"{x / d:.2f}x"])
        added = (statistics.median(ttfts["xcstack"]) - statistics.median(ttfts["direct"])) * 1000
        scale = statistics.mean(results[("xcstack", 4)]) / statistics.mean(results[("xcstack", 1)])
        body = "\n".join([
            "## llm",
            "",
            f"Qwen2.5-Coder-0.5B-Instruct Q4_K_M, llama.cpp (xllamacpp) worker with 8 slots x 512 tokens, "
            f"{threads} threads; streams of {args.tokens} tokens, temperature 0, {args.rounds} rounds interleaved. "
            "Peer: the same worker's own HTTP server called directly (same process, model and threads).",
            "",
            table(["c", "direct tok/s", "xcstack tok/s", "xcstack / direct"], rows),
            "",
            f"- TTFT added by xcstack, p50 at c=1: {added:+.1f} ms (medians of {len(ttfts['xcstack'])} streams each, "
            f"direct {statistics.median(ttfts['direct']) * 1000:.1f} ms, alternating)",
            f"- continuous batching: xcstack aggregate decode at c=4 is {scale:.2f}x c=1",
            f"- RSS: llm worker {rss_mb(llm):.0f} MB; http worker {rss_mb(http):.0f} MB; "
            f"http worker loop lag p99 while 8 streams ran: <= {lag * 1000:.1f} ms (histogram bucket)",
            f"- load average (1 min) at the end of the run: {load:.1f} on {os.cpu_count()} CPUs. Token rates vary "
            "between rounds by more than the relay's cost; read the ratio within a row. The tuning plan gives the "
            f"llm worker {threads} pinned core(s) here (the http worker keeps its own): with one thread a decode "
            "step of the 0.5B is ~50-60 ms and batching 4 sequences makes each step longer, so the c=4 scaling "
            "is what one core gives; it needs more cores for the llm worker to reach 2x.",
        ])
        write_section("llm", "python bench/llm.py " + " ".join(sys.argv[1:]), body)
        print(body)
    finally:
        served.stop()


if __name__ == "__main__":
    main()
