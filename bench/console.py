"""Console benchmark: does an open overview slow the API? Gateway p50 at c=64 with 0 and with 5
consoles polling `/console/overview/data` (the overview page's JSON: /metrics parsed + /readyz),
side by side on the same worker.

One xcstack http worker (uvicorn, security on) pinned to core 0, the mock upstream and wrk on core 1,
as bench/gateway.py runs them. The 5 "consoles" are threads polling every `--poll` seconds (the
console's default is 2 s; 0.5 s makes the test harder) with a principal allowed to see the overview.
Rounds alternate (0, 5, 0, 5, ...) so drift on a shared machine hits both sides; the medians are
compared. Target: p50 changes by at most 5 %.

    .venv/bin/python bench/console.py [--duration 4] [--rounds 3] [--poll 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway as g
from _report import machine_line, table, write_section


async def console_key(service: Any) -> str:
    """The gateway bench's client key, whose role may also read /metrics (the overview's permission)."""
    from xcstack.errors import Conflict
    from xcstack.security.service import SYSTEM, Principal

    # what a sysadmin's overview reads: /metrics and the process table (system:read)
    perms = [("route:/v1/*", "*"), ("model:mock-model", "invoke"), ("route:/metrics", "get"), ("system", "read")]
    with contextlib.suppress(Conflict):
        await service.create_role(SYSTEM, "bench-console", perms)
    with contextlib.suppress(Conflict):
        await service.create_user(SYSTEM, "bench", ["bench-console"], kind="service", password=g.BENCH_PASSWORD)
    user = await service.get_user("bench")
    owner = Principal(user["id"], "bench", ("bench-console",))
    return str((await service.create_api_key(owner, "bench", ["bench-console"], 1))["key"])


def poll(base: str, key: str, every: float, stop: threading.Event, counts: list[int]) -> None:
    req = urllib.request.Request(base + "/console/overview/data", headers={"Authorization": f"Bearer {key}"})
    while not stop.is_set():
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            counts.append(r.status)
        stop.wait(every)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--consoles", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        g.bench_api_key = console_key  # serve_gateway looks it up at call time
        g.serve_gateway(args.serve[0], int(args.serve[1]), args.serve[2], args.serve[3])
        return 0
    work = Path(tempfile.mkdtemp(prefix="xc-bench-console-"))
    procs: list[Any] = []
    try:
        up_port = g.free_port()
        procs.append(g.Proc([sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(up_port),
                             "--tokens", "16"], g.CPU_OTHER, {"PYTHONPATH": str(g.ROOT / "src")}))
        upstream = f"http://127.0.0.1:{up_port}/v1"
        g.wait_http(f"http://127.0.0.1:{up_port}/health", 30, procs[0].p)
        data = work / "data"
        (data / "metrics").mkdir(parents=True)
        env = {"PYTHONPATH": str(g.ROOT / "src"), "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics")}
        config = g.write_config(work / "console.toml", data, upstream, security=True)
        procs += g.start_side_processes(config, env)
        port, keyfile = g.free_port(), work / "key"
        procs.append(g.Proc([sys.executable, str(Path(__file__).resolve()), "--serve", str(config), str(port),
                             "uvicorn", str(keyfile)], g.CPU_GATEWAY, env, work / "worker.log"))
        base = f"http://127.0.0.1:{port}"
        g.wait_http(base + "/healthz", 90, procs[-1].p)
        while not keyfile.exists() or not keyfile.read_text():
            time.sleep(0.1)
        key = keyfile.read_text()
        g.load(base + "/v1", 64, 2.0, key)  # warm-up
        p50: dict[int, list[float]] = {0: [], args.consoles: []}
        rps: dict[int, list[float]] = {0: [], args.consoles: []}
        polls = 0
        for _ in range(args.rounds):
            for n in (0, args.consoles):
                stop, counts = threading.Event(), []
                threads = [threading.Thread(target=poll, args=(base, key, args.poll, stop, counts), daemon=True)
                           for _ in range(n)]
                for t in threads:
                    t.start()
                r = g.load(base + "/v1", 64, args.duration, key)
                stop.set()
                for t in threads:
                    t.join(10)
                assert all(c == 200 for c in counts), counts[:5]
                polls += len(counts)
                p50[n].append(r.p50_ms)
                rps[n].append(r.rps)
        base_p50, with_p50 = statistics.median(p50[0]), statistics.median(p50[args.consoles])
        change = (with_p50 - base_p50) / base_p50 * 100
        rows = [[f"{n} consoles", f"{statistics.median(p50[n]):.2f}", f"{statistics.median(rps[n]):.0f}",
                 ", ".join(f"{x:.2f}" for x in p50[n])] for n in (0, args.consoles)]
        body = (f"{machine_line()}\n\nGateway chat completions at c=64 (wrk, {args.duration:.0f} s x {args.rounds} "
                f"rounds per side, alternating), with 0 and {args.consoles} consoles polling the overview every "
                f"{args.poll} s ({polls} polls answered 200).\n\n"
                + table(["side", "p50 ms (median)", "req/s (median)", "p50 per round"], rows)
                + f"\n\np50 change with {args.consoles} open consoles: **{change:+.1f} %** (target: within 5 %: "
                f"{'met' if abs(change) <= 5 else 'missed'}). The machine is shared with other work: read the "
                "per-round spread before the verdict.\n")
        print(body)
        if not args.no_write:
            write_section("Console", f".venv/bin/python bench/console.py --duration {args.duration:g} "
                          f"--rounds {args.rounds} --poll {args.poll:g}", body)
        return 0
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
