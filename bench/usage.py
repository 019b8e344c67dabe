"""Usage governance overhead and ledger throughput (issue 18).

0. The gateway end to end, governance on vs off side by side in one run: bench/gateway.py's mock
   upstream, its http worker (`xcstack serve`'s app under Granian, pinned to core 0, security on: API
   key, RBAC, audit) and its load generator (wrk on core 1, connections reused). "on": the usage
   capability with quotas on every key, user and group (`*`; the bench user has no group, so two
   apply: each call reserves, settles and writes a ledger record) and a price; "off": `[usage]
   enabled = false`. Both workers run at once and are loaded in turn, in interleaved rounds (the
   order alternates), so drift of the shared machine hits both alike. Reported: added p50 at c=1
   (median of the rounds' differences), req/s at c=64 (ratio of the medians), the rounds' spread as
   the noise, and the worker's CPU time per request (user+system: less sensitive to what else the
   machine runs; its ratio is the req/s ratio of a CPU-bound worker).
1. Quota check + reservation + settlement + ledger enqueue per call, in process (the work governance
   adds to a gateway call; local counters, three applicable quotas: key, user, group), p50/p99 in µs,
   and with Redis counters (one round trip each way) when Redis is up.
2. Ledger records/s into SQLite and PostgreSQL (batches of 2000 with their roll-ups).

    .venv/bin/python bench/usage.py [--rounds 5] [--seconds 3] [--no-gateway] [--only-gateway]
                                    [--pg postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

import gateway as gwb  # noqa: E402  (bench/gateway.py: upstream, worker and load generator)
from xcstack.state.store import StateStore  # noqa: E402
from xcstack.usage.service import UsageService  # noqa: E402
from xcstack.usage.settings import UsageSettings  # noqa: E402

QUOTAS = [{"scope": s, "subject": "*", "metric": m, "period": "day", "limit": 10**12}
          for s, m in (("key", "requests"), ("user", "total_tokens"), ("group", "cost"))]


GOVERNED = "\n[usage]\n" + "".join(
    f'[[usage.quotas]]\nscope = "{q["scope"]}"\nsubject = "*"\nmetric = "{q["metric"]}"\nperiod = "day"\n'
    f"limit = {q['limit']}\n" for q in QUOTAS) + '[usage.prices."mock-model"]\ninput = 2.0\noutput = 8.0\n'
UNGOVERNED = "\n[usage]\nenabled = false\n"


def gateway_side_by_side(rounds: int, seconds: float) -> dict[str, Any]:
    """Governance on and off, both served at once, loaded in interleaved rounds (see the module doc)."""
    work = Path(tempfile.mkdtemp(prefix="xc-bench-usage-"))
    procs: list[Any] = []
    try:
        up_port = gwb.free_port()
        mock = gwb.Proc([sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(up_port),
                         "--tokens", "16"], gwb.CPU_OTHER, {"PYTHONPATH": str(ROOT / "src")})
        procs.append(mock)
        upstream = f"http://127.0.0.1:{up_port}/v1"
        gwb.wait_http(f"http://127.0.0.1:{up_port}/health", 30, mock.p)
        data = work / "data"
        env = {"PYTHONPATH": str(ROOT / "src"), "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics")}
        (data / "metrics").mkdir(parents=True)
        targets: dict[str, tuple[str, str, int]] = {}
        for name, extra in (("off", UNGOVERNED), ("on", GOVERNED)):
            cfg = gwb.write_config(work / f"usage-{name}.toml", data, upstream, security=True)
            cfg.write_text(cfg.read_text() + extra)
            if not targets:
                procs += gwb.start_side_processes(cfg, env)  # the HSM owner
            proc, base, key = gwb.start_worker(cfg, "granian", env, work, f"usage-{name}")
            procs.append(proc)
            targets[name] = (base + "/chat/completions", key, proc.p.pid)
        for url, key, _ in targets.values():
            gwb.load(url, 16, 2, key)  # warm-up
        fields = ("p50", "rps", "p99", "err", "cpu_us")
        res: dict[str, dict[str, list[float]]] = {n: {f: [] for f in fields} for n in targets}
        for r in range(rounds):
            for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                url, key, pid = targets[name]
                cpu0 = gwb.tree_cpu_s(pid)
                c1 = gwb.load(url, 1, seconds, key)
                c64 = gwb.load(url, 64, seconds, key)
                res[name]["cpu_us"].append((gwb.tree_cpu_s(pid) - cpu0) * 1e6 / max(1, c1.requests + c64.requests))
                res[name]["p50"].append(c1.p50_ms * 1000)
                res[name]["rps"].append(c64.rps)
                res[name]["p99"].append(c64.p99_ms)
                res[name]["err"].append(c1.errors + c64.errors)
                print(f"round {r + 1} {name}: c=1 p50 {c1.p50_ms * 1000:.0f} us, c=64 {c64.rps:.0f} req/s "
                      f"(p99 {c64.p99_ms:.1f} ms), worker CPU {res[name]['cpu_us'][-1]:.0f} us/request, "
                      f"errors {c1.errors + c64.errors}", flush=True)
        ledger = _ledger_rows(data)
        return {"res": res, "ledger_rows": ledger, "rounds": rounds, "seconds": seconds}
    finally:
        for p in reversed(procs):
            p.stop()


def _ledger_rows(data: Path) -> int:
    """Records the governed worker wrote (proof that "on" did the work)."""
    async def run() -> int:
        store = StateStore(None, data)
        try:
            row = await store.fetchone("SELECT COUNT(*) AS n FROM usage_records")
            return int(row["n"]) if row else 0
        finally:
            await store.close()

    return asyncio.run(run())


def gateway_report(g: dict[str, Any]) -> list[str]:
    # a round where a run completed nothing (wrk under an overloaded machine) is void for both targets
    keep = [i for i in range(len(g["res"]["on"]["rps"]))
            if all(g["res"][n][f][i] > 0 for n in ("on", "off") for f in ("rps", "p50"))]
    on, off = ({f: [v[i] for i in keep] for f, v in g["res"][n].items()} for n in ("on", "off"))
    void = len(g["res"]["on"]["rps"]) - len(keep)
    added = [a - b for a, b in zip(on["p50"], off["p50"], strict=True)]
    ratio = statistics.median(on["rps"]) / statistics.median(off["rps"])
    ratios = [a / b for a, b in zip(on["rps"], off["rps"], strict=True)]

    def span(v: list[float], fmt: str = "{:.0f}") -> str:
        return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"

    return [
        f"gateway c=1 p50, governance off: {span(off['p50'])} us; on: {span(on['p50'])} us",
        f"added p50 per request: median of round differences {statistics.median(added):.0f} us "
        f"(rounds {', '.join(f'{a:.0f}' for a in added)})",
        f"gateway c=64 req/s, off: {span(off['rps'])}; on: {span(on['rps'])}; ratio of medians {ratio:.2f} "
        f"(per round {', '.join(f'{x:.2f}' for x in ratios)})",
        f"worker CPU per request (c=1 and c=64 runs), off: {span(off['cpu_us'])} us; on: {span(on['cpu_us'])} us; "
        f"added {statistics.median(on['cpu_us']) - statistics.median(off['cpu_us']):.0f} us; CPU-bound req/s ratio "
        f"{statistics.median(off['cpu_us']) / statistics.median(on['cpu_us']):.2f}",
        f"rounds kept {len(keep)} of {len(keep) + void} (void: a run completed no request); "
        f"errors: off {sum(off['err']):.0f}, on {sum(on['err']):.0f}; ledger records written by 'on': "
        f"{g['ledger_rows']:,}",
    ]


async def overhead(redis_url: str | None, n: int) -> tuple[float, float, float]:
    """p50 and p99 wall time of one governed call (reserve, settle, ledger enqueue) and the process's CPU
    time per call including the ledger's writes (its thread), in µs."""
    cfg: dict[str, Any] = {"quotas": QUOTAS, "prices": {"m": {"input": 2, "output": 8}}}
    if redis_url:
        cfg |= {"redis_url": redis_url, "redis_prefix": f"xc:usage-bench:{uuid.uuid4().hex[:6]}:"}
    store = StateStore(None, Path(tempfile.mkdtemp()))
    svc = UsageService(UsageSettings.model_validate(cfg), store)
    await svc.start()
    scope = {"xc.principal": SimpleNamespace(id="apikey:k1", kind="api_key", owner_id="u1", group="g1"),
             "xc.request_id": "r"}
    samples = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        t = await svc.reserve(scope, "chat", "m", 20, 64)
        t.upstream = "up"
        t.record_usage(20, 30)
        await svc.settle(t, 200)
        samples.append(time.perf_counter() - t0)
        if i % 2000 == 0:
            await asyncio.sleep(0)  # let the ledger writer run
    await svc.stop()  # flushes the ledger: its writes count in the CPU time below
    cpu = (time.process_time() - cpu0) / n
    await store.close()
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6, cpu * 1e6


async def ledger_rate(url: str | None, n: int) -> float:
    store = StateStore(url, Path(tempfile.mkdtemp()))
    svc = UsageService(UsageSettings(), store)
    await svc.ledger.migrate()
    now = time.time()
    for i in range(n):
        svc.ledger.enqueue((now, f"k{i % 50}", f"u{i % 20}", f"g{i % 5}", "m", "up", "chat", 10, 20, 30, "v", 0, 200,
                            1.5, f"r{i}"))
    t0 = time.perf_counter()
    await svc.ledger.flush()
    rate = n / (time.perf_counter() - t0)
    await store.close()
    return rate


def cli() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5, help="gateway rounds (each: both targets, c=1 and c=64)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per gateway measurement")
    ap.add_argument("--no-gateway", action="store_true")
    ap.add_argument("--only-gateway", action="store_true")
    a = ap.parse_args()
    if not a.no_gateway:
        for line in gateway_report(gateway_side_by_side(a.rounds, a.seconds)):
            print(line, flush=True)
        if a.only_gateway:
            return
    asyncio.run(main(a))


async def main(a: argparse.Namespace) -> None:
    p50, p99, cpu = await overhead(None, a.n)
    print(f"governance per call, local counters: p50 {p50:.1f} us, p99 {p99:.1f} us, "
          f"CPU {cpu:.1f} us with the ledger writes")
    try:
        p50, p99, cpu = await overhead(a.redis, a.n // 4)
        print(f"governance per call, Redis counters: p50 {p50:.1f} us, p99 {p99:.1f} us, CPU {cpu:.1f} us")
    except Exception as exc:
        print(f"Redis: skipped ({exc!r})")
    print(f"ledger into SQLite: {await ledger_rate(None, 100_000):,.0f} records/s")
    try:
        import psycopg

        db = "xc_usage_bench_" + uuid.uuid4().hex[:6]  # a database of its own, dropped after
        with psycopg.connect(a.pg, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db}")
        try:
            url = a.pg.rsplit("/", 1)[0] + "/" + db
            print(f"ledger into PostgreSQL: {await ledger_rate(url, 100_000):,.0f} records/s")
        finally:
            with psycopg.connect(a.pg, autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    except Exception as exc:
        print(f"PostgreSQL: skipped ({exc!r})")


if __name__ == "__main__":
    cli()
