"""HTTP server choice for the http workers: uvicorn (uvloop + httptools) vs Granian (embedded).

Both run the real xcstack worker (`xcstack serve`, one http worker pinned to core 0, security off,
a bench plugin with a trivial route and a proxy route to a local aiohttp upstream); wrk and the
upstream share core 1. Writes req/s, p50/p99 and worker RSS into docs/benchmarks.md.

    .venv/bin/python bench/http_stack.py [--duration 8] [--connections 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _report import table, write_section  # noqa: E402

UPSTREAM_CODE = """
import asyncio, sys
from aiohttp import web
async def h(request):
    return web.json_response({"id": "x", "object": "chat.completion", "choices": [{"text": "hello"}]})
app = web.Application(); app.router.add_get("/", h)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is needed (Debian package 'wrk'): apt-get install wrk")
    return found


def wrk(url: str, connections: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", "1", ensure_wrk(), "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "errors": float(errors.group(1)) if errors else 0.0}


def worker_rss_mb(supervisor_pid: int) -> float:
    out = subprocess.run(["pgrep", "-P", str(supervisor_pid), "-f", "xcstack.worker --fd"],
                         capture_output=True, text=True).stdout.split()
    total = 0
    for pid in out:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def run_server(server: str, upstream: str, duration: int, connections: int) -> list[list[object]]:
    port = free_port()
    data = tempfile.mkdtemp(prefix="xc-bench-http-")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XC_DATA_DIR": data, "XC_SERVER__PORT": str(port),
           "XC_SERVER__WORKERS": "1", "XC_SERVER__WORKER_CPUS": "[0]", "XC_SERVER__HTTP_SERVER": server,
           "XC_SERVER__PLUGINS": '["bench._http_stack_app"]', "XC_SECURITY__ENABLED": "false",
           "XC_OBSERVABILITY__ACCESS_LOG": "false", "XC_OBSERVABILITY__LOG_LEVEL": "WARNING",
           "XC_BENCH_UPSTREAM": upstream}
    proc = subprocess.Popen([sys.executable, "-m", "xcstack", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[list[object]] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/bench/ping")
        for route in ("/bench/ping", "/bench/proxy"):
            wrk(base + route, connections, 2)  # warm-up
            r = wrk(base + route, connections, duration)
            rows.append([server, route, connections, f"{r['rps']:,.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                         int(r["errors"]), f"{worker_rss_mb(proc.pid):.0f}"])
            print(rows[-1], flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(data, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    up_port = free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", UPSTREAM_CODE, str(up_port)])
    try:
        wait_http(f"http://127.0.0.1:{up_port}/")
        direct = wrk(f"http://127.0.0.1:{up_port}/", args.connections, args.duration)
        rows: list[list[object]] = [["upstream direct (aiohttp.web)", "/", args.connections,
                                     f"{direct['rps']:,.0f}", f"{direct['p50']:.2f}", f"{direct['p99']:.2f}", 0, "-"]]
        for server in ("uvicorn", "granian"):
            rows += run_server(server, f"http://127.0.0.1:{up_port}/", args.duration, args.connections)
    finally:
        upstream.terminate()
        upstream.wait()
    by = {(r[0], r[1]): float(str(r[3]).replace(",", "")) for r in rows}
    winner = max(("uvicorn", "granian"), key=lambda s: by[(s, "/bench/proxy")] + by[(s, "/bench/ping")])
    body = (
        "## HTTP server for the http workers (issue 2)\n\n"
        "One xcstack http worker (full middleware: request id, metrics, access-log off) pinned to core 0; "
        "wrk (1 thread) and the aiohttp upstream on core 1. `/bench/ping` returns a small JSON; "
        "`/bench/proxy` fetches a small JSON from the upstream through a pooled aiohttp session.\n\n"
        + table(["server", "route", "connections", "req/s", "p50 ms", "p99 ms", "non-2xx", "worker RSS MB"], rows)
        + f"\n\nFaster in this run (sum of both routes' req/s): **{winner}**."
    )
    write_section("http_stack", "python bench/http_stack.py", body)
    print(body)


if __name__ == "__main__":
    main()
