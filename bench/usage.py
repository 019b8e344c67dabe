"""Usage governance overhead and ledger throughput (issue 18).

1. Quota check + reservation + settlement + ledger enqueue per call, in process (the work governance
   adds to a gateway call; local counters, three applicable quotas: key, user, group), p50/p99 in µs,
   and with Redis counters (one round trip each way) when Redis is up.
2. Ledger records/s into SQLite and PostgreSQL (batches of 2000 with their roll-ups).

    .venv/bin/python bench/usage.py [--pg postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from xcstack.state.store import StateStore
from xcstack.usage.service import UsageService
from xcstack.usage.settings import UsageSettings

QUOTAS = [{"scope": s, "subject": "*", "metric": m, "period": "day", "limit": 10**12}
          for s, m in (("key", "requests"), ("user", "total_tokens"), ("group", "cost"))]


async def overhead(redis_url: str | None, n: int) -> tuple[float, float]:
    cfg: dict[str, Any] = {"quotas": QUOTAS, "prices": {"m": {"input": 2, "output": 8}}}
    if redis_url:
        cfg |= {"redis_url": redis_url, "redis_prefix": f"xc:usage-bench:{uuid.uuid4().hex[:6]}:"}
    store = StateStore(None, Path(tempfile.mkdtemp()))
    svc = UsageService(UsageSettings.model_validate(cfg), store)
    await svc.start()
    scope = {"xc.principal": SimpleNamespace(id="apikey:k1", kind="api_key", owner_id="u1", group="g1"),
             "xc.request_id": "r"}
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        t = await svc.reserve(scope, "chat", "m", 20, 64)
        t.upstream = "up"
        t.record_usage(20, 30)
        await svc.settle(t, 200)
        samples.append(time.perf_counter() - t0)
        if i % 2000 == 0:
            await asyncio.sleep(0)  # let the ledger writer run
    await svc.stop()
    await store.close()
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("-n", type=int, default=20_000)
    a = ap.parse_args()
    p50, p99 = await overhead(None, a.n)
    print(f"governance per call, local counters: p50 {p50:.1f} us, p99 {p99:.1f} us")
    try:
        p50, p99 = await overhead(a.redis, a.n // 4)
        print(f"governance per call, Redis counters: p50 {p50:.1f} us, p99 {p99:.1f} us")
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
    asyncio.run(main())
