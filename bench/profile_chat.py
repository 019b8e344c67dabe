"""CPU per request of one http worker on the non-streamed chat path, per configuration, interleaved.

Starts the mock upstream and the HSM owner (core 1) and one http worker per configuration (core 0), as
bench/gateway.py does (its helpers), then loads each worker in turn with wrk (reused connections, core 1)
for `--rounds` rounds and reports the worker's CPU time (user + system, /proc) per request: CPU time,
not wall time, so the figures hold up on a shared machine. Configurations:

- default: security (API key, RBAC, audit), usage governance and content-safety labels on
- usage-off: `[usage] enabled = false`;  labels-off: `[safety.label] enabled = false`
- security-off: `[security] enabled = false` (usage and labels on)

`--profile NAME` also records that worker with py-spy (a dev tool: `pip install py-spy`) during one
extra load and prints the top frames (self time).

`--inproc`: no http server and no load generator: each configuration's app (`build_worker_app`) runs in
a process of its own that calls it as ASGI (`--conns` concurrent requests, the mock upstream over TCP)
and reports its process CPU per request; the configurations take turns, batch by batch. Without
Granian's and wrk's share this shows the app's own cost, with less noise. `--cprofile NAME` prints
that configuration's cProfile (cumulative and own time) over one more batch.

    .venv/bin/python bench/profile_chat.py [--rounds 3] [--seconds 4] [--conns 16] [--profile default]
    .venv/bin/python bench/profile_chat.py --inproc [--rounds 7] [--requests 3000] [--cprofile default]
    .venv/bin/python bench/profile_chat.py --inproc --baseline /tmp/base   # after `git worktree add /tmp/base REV`
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gateway as gw  # noqa: E402  (bench/gateway.py: its helpers)

EXTRA = {
    "default": "",
    "usage-off": "\n[usage]\nenabled = false\n",
    "labels-off": "\n[safety.label]\nenabled = false\n",
    "security-off": "",
}


def configs(work: Path, data: Path, upstream: str, names: list[str]) -> dict[str, Path]:
    out = {}
    for name in names:
        cfg = gw.write_config(work / f"{name}.toml", data, upstream, security=name != "security-off")
        cfg.write_text(cfg.read_text() + EXTRA[name])
        out[name] = cfg
    return out


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy not found: no profile", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "-r", "500", "-d", str(int(seconds) + 1), "-p", str(pid),
                             "--format", "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=gw.pinned(gw.CPU_OTHER))


def top_frames(raw: Path, n: int = 25) -> list[tuple[str, float, float]]:
    """(frame, self %, total %) from py-spy's raw (collapsed stacks) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        samples += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    return [(f, 100 * c / samples, 100 * total[f] / samples) for f, c in own.most_common(n)]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process so far, by thread name (summed over equal names)."""
    import threading

    names = {t.native_id: t.name.split(" (")[0] for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), "other")
        name = "main" if int(task.name) == os.getpid() else name.rstrip("0123456789_-")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        out[name + "(sys)"] = out.get(name + "(sys)", 0.0) + int(fields[12]) / tick
    return out


# -- in process: the app called as ASGI ----------------------------------------------------------------
def inproc_child(config: str, conns: int) -> None:
    """Build the worker app from `config`, then per line of stdin (`run N` / `profile N`) serve N chat
    requests at `conns` concurrency and print a JSON line (CPU ms per request, errors)."""
    os.environ["XC_CONFIG"] = config
    sys.path.insert(0, os.environ.get("XC_PROFILE_SRC") or str(ROOT / "src"))  # --baseline: another tree's
    from xcstack.config import load_settings
    from xcstack.worker import build_worker_app

    settings = load_settings(config)
    app = build_worker_app(settings, lambda: None)
    security = next((c for c in app.state.xc.capabilities if c.name == "security"), None)
    body = json.dumps(gw.BODY).encode()

    async def one(headers: list[tuple[bytes, bytes]], n: int) -> int:
        done = asyncio.Event()
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif not msg.get("more_body"):
                done.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000 + n),
                 "server": ("127.0.0.1", 8000), "state": {}}
        await app(scope, receive, send)
        return status

    async def batch(headers: list[tuple[bytes, bytes]], n: int) -> tuple[float, int]:
        todo = iter(range(n))
        errors = 0

        async def worker() -> None:
            nonlocal errors
            for i in todo:
                if await one(headers, i) != 200:
                    errors += 1

        c0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(conns)))
        return (time.process_time() - c0) * 1000 / n, errors

    async def main() -> None:
        async with app.router.lifespan_context(app):
            key = await gw.bench_api_key(security.service) if security is not None else "sk-none"
            headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode()),
                       (b"host", b"127.0.0.1:8000"), (b"content-length", str(len(body)).encode())]
            await batch(headers, 200)  # warm-up
            print(json.dumps({"ready": True}), flush=True)
            loop = asyncio.get_running_loop()
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return
                cmd, n = line.split()
                if cmd == "profile":
                    import cProfile
                    import io
                    import pstats

                    prof = cProfile.Profile()
                    prof.enable()
                    ms, errors = await batch(headers, int(n))
                    prof.disable()
                    prof.dump_stats(Path(config).with_suffix(".pstats"))
                    out = io.StringIO()
                    st = pstats.Stats(prof, stream=out)
                    st.sort_stats("cumulative").print_stats(45)
                    st.sort_stats("tottime").print_stats(35)
                    print(json.dumps({"ms": ms, "errors": errors, "profile": out.getvalue(),
                                      "pstats": str(Path(config).with_suffix(".pstats"))}), flush=True)
                else:
                    t0 = thread_cpu()
                    ms, errors = await batch(headers, int(n))
                    t1 = thread_cpu()
                    threads = {k: round((v - t0.get(k, 0.0)) * 1000 / int(n), 4) for k, v in t1.items()}
                    print(json.dumps({"ms": ms, "errors": errors, "threads": threads}), flush=True)

    if settings.server.loop in ("auto", "uvloop"):
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def inproc(cfgs: dict[str, Path], env: dict[str, str], args: argparse.Namespace) -> None:
    kids = {}
    trees = {"": ""} if not args.baseline else {"": "", " (base)": str(Path(args.baseline).resolve() / "src")}
    for name, cfg in cfgs.items():
        for suffix, src in trees.items():
            kids[name + suffix] = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(cfg), str(args.conns)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **env, "XC_PROFILE_SRC": src},
                text=True, preexec_fn=gw.pinned(gw.CPU_GATEWAY))

    def ask(name: str, cmd: str) -> dict[str, Any]:
        p = kids[name]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        while True:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"{name}: the child exited")
            with contextlib.suppress(ValueError):
                out: dict[str, Any] = json.loads(line)
                if isinstance(out, dict) and "ms" in out:
                    return out

    try:
        for name, p in kids.items():  # wait until each is ready
            assert p.stdout is not None
            while '"ready"' not in (line := p.stdout.readline()):
                if not line:
                    raise RuntimeError(f"{name}: the child exited before it was ready")
        per: dict[str, list[float]] = {n: [] for n in kids}
        threads: dict[str, dict[str, float]] = {n: {} for n in kids}
        for _ in range(args.rounds):
            for name in kids:
                out = ask(name, f"run {args.requests}")
                assert out["errors"] == 0, (name, out)
                per[name].append(out["ms"])
                for t, v in out["threads"].items():
                    threads[name][t] = threads[name].get(t, 0.0) + v / args.rounds
        print(f"app CPU per request in process (ms; {args.rounds} interleaved batches of {args.requests}, "
              f"c={args.conns}, no http server; shared machine: compare within this run)")
        for name, v in per.items():
            s = sorted(v)
            print(f"  {name:20s} median {s[len(s) // 2]:.3f}  min {s[0]:.3f}  all {[round(x, 3) for x in v]}")
            print("      by thread (mean ms/req): " + ", ".join(f"{t} {x:.3f}" for t, x in sorted(
                threads[name].items(), key=lambda kv: -kv[1]) if x >= 0.001))
        if args.cprofile:
            out = ask(args.cprofile, f"profile {args.requests}")
            print(out["profile"])
            print("pstats:", out["pstats"])
    finally:
        for p in kids.values():
            if p.stdin is not None:
                p.stdin.close()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--configs", default=",".join(EXTRA))
    ap.add_argument("--profile", default="", help="configuration to record with py-spy")
    ap.add_argument("--inproc", action="store_true", help="call each app as ASGI in its own process")
    ap.add_argument("--requests", type=int, default=3000, help="--inproc: requests per batch")
    ap.add_argument("--cprofile", default="", help="--inproc: configuration to profile with cProfile")
    ap.add_argument("--baseline", default="", help="--inproc: also run each configuration from this checkout "
                    "(e.g. a `git worktree` of the commit before a change): A/B in one run")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "CONNS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        inproc_child(args.child[0], int(args.child[1]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="xc-prof-"))
    procs: list[gw.Proc] = []
    try:
        up_port = gw.free_port()
        procs.append(gw.Proc([sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(up_port),
                              "--tokens", "16"], gw.CPU_OTHER, {"PYTHONPATH": str(ROOT / "src")}))
        upstream = f"http://127.0.0.1:{up_port}/v1"
        gw.wait_http(f"http://127.0.0.1:{up_port}/health", 30, procs[-1].p)
        data = work / "data"
        env = {"PYTHONPATH": str(ROOT / "src"), "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics")}
        (data / "metrics").mkdir(parents=True)
        cfgs = configs(work, data, upstream, args.configs.split(","))
        procs += gw.start_side_processes(next(iter(cfgs.values())), env)
        if args.inproc:
            inproc(cfgs, env, args)
            return 0
        workers = {}
        for name, cfg in cfgs.items():
            w, base, key = gw.start_worker(cfg, "granian", env, work, name)
            procs.append(w)
            workers[name] = (w.p.pid, base + "/chat/completions", key)
            gw.load(workers[name][1], 4, 1, key)  # warm-up
        per: dict[str, list[float]] = {n: [] for n in workers}
        rps: dict[str, list[float]] = {n: [] for n in workers}
        for _ in range(args.rounds):
            for name, (pid, url, key) in workers.items():
                c0 = gw.tree_cpu_s(pid)
                r = gw.load(url, args.conns, args.seconds, key)
                cpu = gw.tree_cpu_s(pid) - c0
                assert r.errors == 0, (name, r)
                per[name].append(cpu * 1000 / max(1, r.requests))
                rps[name].append(r.rps)
        print(f"worker CPU per request (ms; {args.rounds} interleaved rounds of {args.seconds:g} s, c={args.conns}; "
              "shared machine: compare within this run)")
        for name in workers:
            v = sorted(per[name])
            print(f"  {name:20s} median {v[len(v) // 2]:.3f}  min {v[0]:.3f}  all {[round(x, 3) for x in per[name]]}"
                  f"  req/s {[round(x) for x in rps[name]]}")
        if args.profile:
            pid, url, key = workers[args.profile]
            out = work / "prof.txt"
            spy = py_spy(pid, args.seconds + 2, out)
            if spy is not None:
                time.sleep(1)
                gw.load(url, args.conns, args.seconds, key)
                spy.wait()
                print(f"py-spy {args.profile} (self %, total %): {out}")
                for f, s, t in top_frames(out):
                    print(f"  {s:5.1f} {t:5.1f}  {f}")
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
