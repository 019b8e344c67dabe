"""Vector search benchmark: xcstack vs each engine's own client, in one run.

Data: N × 384 float32 vectors with structure (rank-32 latent + noise), queries from the same
distribution, exact top-10 by brute force (numpy) as ground truth. For each backend:

- insert rows/s: through xcstack's service layer (VectorService.upsert: validation + backend) and
  through the engine's client directly (pymilvus MilvusClient.insert / psycopg executemany), each
  in batches of 1,000 into its own collection;
- search p50/p99 and recall@10 at two ef settings, sequential queries, on the same collection:
  the engine's client directly, xcstack's service layer (VectorService.search), and the full HTTP
  path (Starlette app in-process through httpx's ASGI transport — this includes httpx's own
  client cost);
- Milvus only: event-loop lag while searches run (xcstack thread pool vs pymilvus AsyncMilvusClient),
  with Milvus Lite in this process and as a separate process.

    python bench/vectors.py                 # 100k for pgvector, 20k for Milvus Lite
    python bench/vectors.py --n 5000 --milvus-n 5000 --queries 50   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import table, write_section
from xcstack.config import load_settings
from xcstack.vector.service import VectorService

DIM = 384
K = 10
BATCH = 1000


def make_data(n: int, nq: int, seed: int = 7) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((32, DIM)).astype(np.float32)
    x = (rng.standard_normal((n + nq, 32)).astype(np.float32) @ basis) + 0.5 * rng.standard_normal(
        (n + nq, DIM)
    ).astype(np.float32)
    return x[:n], x[n:]


def ground_truth(x: np.ndarray[Any, Any], q: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    for i in range(0, len(qn), 64):
        s = qn[i : i + 64] @ xn.T
        out.append(np.argsort(-s, axis=1)[:, :K])
    return np.vstack(out)


def recall(found: list[list[str]], truth: np.ndarray[Any, Any]) -> float:
    hits = sum(len({int(i) for i in f} & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (K * len(found))


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] * 1000


class Result:
    def __init__(self) -> None:
        self.insert: list[list[object]] = []
        self.search: list[list[object]] = []
        self.lag: list[list[object]] = []
        self.notes: list[str] = []


async def time_queries(fn: Any, q: np.ndarray[Any, Any]) -> tuple[list[float], list[list[str]]]:
    lat: list[float] = []
    ids: list[list[str]] = []
    for v in q:
        t0 = time.perf_counter()
        got = await fn(v)
        lat.append(time.perf_counter() - t0)
        ids.append(got)
    return lat, ids


async def search_rows(
    backend: str,
    n: int,
    efs: list[int],
    q: np.ndarray[Any, Any],
    truth: np.ndarray[Any, Any],
    direct: Any,
    service: VectorService,
    http: Any,
    res: Result,
) -> None:
    """The three paths interleaved query by query (rotating order, each query warmed by one untimed run),
    so that load from other users of the machine hits all of them alike; overhead = median of the
    per-query differences."""
    raw = RawASGI(http._transport.app)
    for ef in efs:

        async def via_direct(v: Any, ef: int = ef) -> list[str]:
            return list(await direct(v, ef))

        async def via_service(v: Any, ef: int = ef) -> list[str]:
            hits = await service.search("bench", vectors=[v.tolist()], top_k=K, ef=ef)
            return [h.id for h in hits[0]]

        async def via_http(v: Any, ef: int = ef) -> list[str]:
            body = orjson.dumps({"vector": v.tolist(), "top_k": K, "ef": ef})
            status, out = await raw.post("/v1/vectors/bench/search", body)
            assert status == 200, out[:300]
            return [h["id"] for h in orjson.loads(out)["data"]]

        paths = [
            ("engine client (direct)", via_direct),
            ("xcstack service layer", via_service),
            ("xcstack HTTP (ASGI)", via_http),
        ]
        for _, fn in paths:  # warm-up
            await time_queries(fn, q[:5])
        lat: dict[str, list[float]] = {label: [] for label, _ in paths}
        ids: dict[str, list[list[str]]] = {label: [] for label, _ in paths}
        for i, v in enumerate(q):
            # untimed first run: at 100k rows the table and index outgrow shared_buffers (128 MB), and the
            # first execution of a query pays ~3 ms of page reads the next ones do not; without this the
            # path that happened to run first paid it (a 2x gap between pooled connections, measured)
            await via_direct(v)
            for j in range(len(paths)):
                label, fn = paths[(i + j) % len(paths)]
                t0 = time.perf_counter()
                got = await fn(v)
                lat[label].append(time.perf_counter() - t0)
                ids[label].append(got)
        for label, _ in paths:
            res.search.append(
                [
                    backend,
                    n,
                    ef,
                    label,
                    f"{pct(lat[label], 50):.2f}",
                    f"{pct(lat[label], 99):.2f}",
                    f"{recall(ids[label], truth):.3f}",
                ]
            )
        base = lat["engine client (direct)"]
        d = statistics.median(a - b for a, b in zip(lat["xcstack service layer"], base, strict=True)) * 1000
        h = statistics.median(a - b for a, b in zip(lat["xcstack HTTP (ASGI)"], base, strict=True)) * 1000
        same = ids["xcstack service layer"] == ids["engine client (direct)"]
        res.notes.append(
            f"{backend} ef={ef}: xcstack adds {d:+.2f} ms (service layer), {h:+.2f} ms (HTTP/ASGI) per search "
            f"(median of per-query differences); identical result ids to the direct client: "
            f"{'yes' if same else 'no'}"
        )


class RawASGI:
    """POST straight into the ASGI app (no HTTP client in the way): the cost of xcstack's own HTTP
    stack — middleware, routing, JSON parse/validation/serialisation — without a client's."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        done = False
        status = 0
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, send)
        return status, b"".join(chunks)


async def open_app(settings: Any) -> Any:
    import httpx

    from xcstack.app import create_app

    app = create_app(settings, capability_modules=["xcstack.vector.capability"])
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://xc", timeout=600)
    cap = next(c for c in app.state.xc.capabilities if c.name == "vector")
    return app, lifespan, client, cap


async def insert_via_service(service: VectorService, name: str, x: np.ndarray[Any, Any]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), BATCH):
        await service.upsert(
            name, ids=[str(j) for j in range(i, min(len(x), i + BATCH))], vectors=x[i : i + BATCH].tolist()
        )
    return len(x) / (time.perf_counter() - t0)


# ---- pgvector ---------------------------------------------------------------------------------


async def bench_pgvector(args: argparse.Namespace, x: Any, q: Any, truth: Any, res: Result) -> None:
    import psycopg
    from pgvector.psycopg import register_vector_async

    from xcstack.vector.devpg import DevPostgres

    pg = DevPostgres.create() if not args.pg_url else None
    url = args.pg_url or (pg.url if pg else "")
    try:
        settings = load_settings(
            data_dir=Path(tempfile.mkdtemp(prefix="xcv-bench-")),
            vector={
                "backend": "pgvector",
                "max_top_k": 100,
                "op_timeout_s": 600,
                "pgvector": {
                    "url": url,
                    "db_schema": "xcv_bench",
                    "pool_max": 4,
                    "m": 16,
                    "ef_construction": 64,
                    "index_on_create": False,
                },
            },
        )
        _app, lifespan, http, cap = await open_app(settings)
        service: VectorService = cap.service
        try:
            if "bench" in await service.list_collections():
                await service.drop_collection("bench")
            await service.create_collection("bench", DIM, "cosine")
            rate = await insert_via_service(service, "bench", x)
            res.insert.append(["pgvector", len(x), "xcstack service layer", f"{rate:,.0f}", "bulk load, no index yet"])
            print(f"pgvector: inserted {len(x)} via xcstack at {rate:,.0f} rows/s", flush=True)
            t0 = time.perf_counter()
            await service.build_index("bench")
            build_s = time.perf_counter() - t0
            res.notes.append(f"pgvector: explicit index build (CREATE INDEX hnsw) of {len(x):,} rows: {build_s:.1f} s")
            print(f"pgvector: index build {build_s:.1f}s", flush=True)

            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            await register_vector_async(conn)
            # direct insert on its own table with the same index, a sample of the rows
            ns = min(len(x), args.direct_insert_n)
            await conn.execute("DROP TABLE IF EXISTS xcv_bench.direct_ins")
            await conn.execute(
                f"CREATE TABLE xcv_bench.direct_ins (id text primary key, embedding vector({DIM}), payload jsonb)"
            )
            t0 = time.perf_counter()
            async with conn.cursor() as cur:
                for i in range(0, ns, BATCH):
                    await cur.executemany(
                        "INSERT INTO xcv_bench.direct_ins (id, embedding, payload) VALUES (%s, %b, '{}')",
                        [(str(j), x[j]) for j in range(i, min(ns, i + BATCH))],
                    )
            rate_d = ns / (time.perf_counter() - t0)
            res.insert.append(
                ["pgvector", ns, "psycopg executemany (direct)", f"{rate_d:,.0f}", "no index, fewer rows"]
            )
            await conn.execute("DROP TABLE xcv_bench.direct_ins")

            state = {"ef": None}

            async def direct(v: Any, ef: int) -> list[str]:
                if state["ef"] != ef:
                    await conn.execute(f"SET hnsw.ef_search = {int(ef)}")
                    state["ef"] = ef
                cur = await conn.execute(
                    "SELECT id FROM xcv_bench.xcv_bench ORDER BY embedding <=> %b LIMIT %s", (v, K)
                )
                return [r[0] for r in await cur.fetchall()]

            await search_rows("pgvector", len(x), args.efs, q, truth, direct, service, http, res)
            await conn.close()
            await service.drop_collection("bench")
        finally:
            await http.aclose()
            await lifespan.__aexit__(None, None, None)
    finally:
        if pg is not None:
            pg.destroy()


# ---- Milvus Lite ------------------------------------------------------------------------------


async def bench_milvus(args: argparse.Namespace, x: Any, q: Any, truth: Any, res: Result) -> None:
    from pymilvus import DataType, MilvusClient

    data_dir = Path(tempfile.mkdtemp(prefix="xcv-bench-milvus-"))
    settings = load_settings(
        data_dir=data_dir,
        vector={"backend": "milvus", "op_timeout_s": 600, "milvus": {"pool_size": 4, "m": 16, "ef_construction": 64}},
    )
    _app, lifespan, http, cap = await open_app(settings)
    service: VectorService = cap.service
    store = cap.store
    try:
        await service.create_collection("bench", DIM, "cosine")
        rate = await insert_via_service(service, "bench", x)
        res.insert.append(["milvus-lite", len(x), "xcstack service layer", f"{rate:,.0f}", "memtable; index on load"])
        print(f"milvus: inserted {len(x)} via xcstack at {rate:,.0f} rows/s", flush=True)
        t0 = time.perf_counter()
        await service.build_index("bench")
        build_s = time.perf_counter() - t0
        res.notes.append(
            f"milvus-lite: explicit index build (flush + release + load) of {len(x):,} rows: {build_s:.1f} s"
        )
        print(f"milvus: index build {build_s:.1f}s", flush=True)

        client = MilvusClient(uri=store.uri)
        ns = min(len(x), args.direct_insert_n)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        ip = client.prepare_index_params()
        ip.add_index(
            field_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 64}
        )
        client.create_collection("direct_ins", schema=schema, index_params=ip)
        t0 = time.perf_counter()
        for i in range(0, ns, BATCH):
            client.insert("direct_ins", [{"id": str(j), "vector": x[j]} for j in range(i, min(ns, i + BATCH))])
        rate_d = ns / (time.perf_counter() - t0)
        res.insert.append(["milvus-lite", ns, "pymilvus insert (direct)", f"{rate_d:,.0f}", "fewer rows"])
        client.drop_collection("direct_ins")

        async def direct(v: Any, ef: int) -> list[str]:
            r = client.search(
                "bench",
                data=[v],
                limit=K,
                anns_field="vector",
                search_params={"metric_type": "COSINE", "params": {"ef": ef}},
            )
            return [str(h["id"]) for h in r[0]]

        await search_rows("milvus-lite", len(x), args.efs, q, truth, direct, service, http, res)
        if args.lag:
            await loop_lag_rows(store.uri, q, res, where="in-process Lite server")
        client.close()
    finally:
        await http.aclose()
        await lifespan.__aexit__(None, None, None)
    if args.lag:
        await lag_side_process(data_dir, q, res)


async def measure_lag(run: Any, n: int, conc: int) -> tuple[float, float, float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def monitor() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    mon = asyncio.create_task(monitor())
    lat: list[float] = []

    async def worker(i: int) -> None:
        for j in range(i, n, conc):
            t0 = time.perf_counter()
            await run(j)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(i) for i in range(conc)))
    stop.set()
    await mon
    return pct(lat, 50), pct(lags, 99), max(lags) * 1000


async def loop_lag_rows(uri: str, q: Any, res: Result, where: str) -> None:
    from pymilvus import AsyncMilvusClient, MilvusClient

    from xcstack.vector.pool import BlockingPool

    sp = {"metric_type": "COSINE", "params": {"ef": 64}}
    sync = MilvusClient(uri=uri)
    pool = BlockingPool("lag", 4, 30)
    n = min(len(q), 80)

    async def via_pool(j: int) -> Any:
        return await pool.run(sync.search, "bench", data=[q[j]], limit=K, search_params=sp, timeout=30)

    p50, lag99, lagmax = await measure_lag(via_pool, n, 4)
    res.lag.append(
        [where, "MilvusClient in a bounded thread pool (xcstack)", f"{p50:.1f}", f"{lag99:.2f}", f"{lagmax:.1f}"]
    )
    aclient = AsyncMilvusClient(uri=uri)

    async def via_async(j: int) -> Any:
        return await aclient.search("bench", data=[q[j].tolist()], limit=K, search_params=sp, timeout=30)

    await via_async(0)
    p50, lag99, lagmax = await measure_lag(via_async, n, 4)
    res.lag.append([where, "AsyncMilvusClient (grpc.aio)", f"{p50:.1f}", f"{lag99:.2f}", f"{lagmax:.1f}"])
    await aclient.close()
    sync.close()
    pool.shutdown()


def _serve_lite(data_dir: str, port: int) -> None:
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    _server, _db, _ = start_server_in_thread(str(Path(data_dir) / "vectors" / "milvus.db"), port=port)
    time.sleep(3600)


async def lag_side_process(data_dir: Path, q: Any, res: Result) -> None:
    import socket

    from pymilvus import MilvusClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_serve_lite, args=(str(data_dir), port), daemon=True)
    proc.start()
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                c = MilvusClient(uri=uri, timeout=2)
                c.load_collection("bench", timeout=600)
                c.close()
                break
            except Exception:
                await asyncio.sleep(0.3)
        await loop_lag_rows(uri, q, res, where="Lite server in a side process")
    finally:
        proc.terminate()
        proc.join(10)


# ---- main -------------------------------------------------------------------------------------


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="rows for pgvector")
    ap.add_argument("--milvus-n", type=int, default=100_000, help="rows for Milvus Lite (its index build is slow)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--efs", type=lambda s: [int(v) for v in s.split(",")], default=[40, 100])
    ap.add_argument("--direct-insert-n", type=int, default=10_000, help="rows for the direct-client insert sample")
    ap.add_argument("--backends", default="pgvector,milvus")
    ap.add_argument("--pg-url", default=os.environ.get("XC_BENCH_PG_URL"), help="default: embedded PostgreSQL")
    ap.add_argument("--no-lag", dest="lag", action="store_false", help="skip the event-loop lag measurement")
    ap.add_argument("--no-write", dest="write", action="store_false", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = Result()
    backends = args.backends.split(",")
    if "pgvector" in backends:
        x, q = make_data(args.n, args.queries)
        truth = ground_truth(x, q)
        await bench_pgvector(args, x, q, truth, res)
    if "milvus" in backends:
        x, q = make_data(args.milvus_n, args.queries, seed=8)
        truth = ground_truth(x, q)
        await bench_milvus(args, x, q, truth, res)

    body = "\n\n".join(
        [
            "## Vector search (pgvector, Milvus Lite)\n\n"
            f"{DIM}-d structured vectors (rank-32 latent + noise), cosine, HNSW m=16 ef_construction=64, "
            f"{args.queries} sequential queries, top-{K}; recall@10 against exact brute force. "
            "All paths in one run on the same collection; each query first runs once untimed (the data "
            "outgrows PostgreSQL's shared_buffers: a query's first execution pays its page reads), then on the "
            "three paths in rotating order. *service layer* = `VectorService.search` "
            "(validation + pool + backend); *HTTP (ASGI)* = the full Starlette app (middleware, routing, "
            "JSON in/out) called in-process as ASGI, no HTTP client or socket in the way. "
            "pgvector runs on the embedded PostgreSQL 18 + pgvector 0.8.6; "
            f"Milvus Lite {args.milvus_n:,} rows (its index build takes minutes at 100k). "
            "The direct-client insert sample uses fewer rows (insert rate only). Shared 2-core machine: noisy.",
            "### Insert",
            table(["backend", "rows", "path", "rows/s", "note"], res.insert),
            "### Search",
            table(["backend", "rows", "ef", "path", "p50 ms", "p99 ms", "recall@10"], res.search),
            "\n".join(f"- {n}" for n in res.notes),
        ]
        + (
            [
                "### Event-loop lag while Milvus searches run (4 concurrent, ef=64)",
                table(["Lite server", "client", "search p50 ms", "loop lag p99 ms", "loop lag max ms"], res.lag),
            ]
            if res.lag
            else []
        )
    )
    print(body)
    if args.write:
        cmd = "python bench/vectors.py " + " ".join(sys.argv[1:])
        write_section("vectors", cmd.strip(), body)


if __name__ == "__main__":
    asyncio.run(main())
