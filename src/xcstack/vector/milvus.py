"""Milvus backend: pymilvus `MilvusClient`, Milvus Lite (embedded) or a Milvus server — one code path.

- URI: unset → Milvus Lite under `<data_dir>/vectors/milvus.db` (in this process, or a supervised
  side process every worker connects to); `http(s)://host:19530` → standalone or cluster.
- pymilvus calls block, so they run in a dedicated bounded thread pool (`pool.BlockingPool`):
  `milvus.pool_size` at once, acquire timeout → 503 `vector_pool_exhausted`. (The async client is
  not used: with Lite the server shares this process and its GIL, so gRPC-asyncio buys nothing on
  the server side; measured in docs/vectors.md.)
- Index build/load is explicit and visible: Milvus Lite 3.x builds its faiss index only on
  release+load (flushed segments), ~1.5 min at 100k×384. `build_index` runs flush → release → load
  and logs progress every few seconds; `/readyz` reports loads in progress; collections are loaded at
  start (`load_on_start`) and after a reconnect.
- Health: a loop pings the engine; on failure it drops the client and reconnects (for Lite that
  restarts the embedded server); requests meanwhile fail fast with 503 `vector_backend_unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

from xcstack.aio import cancel_and_wait
from xcstack.vector import metrics
from xcstack.vector.pool import BlockingPool
from xcstack.vector.pymilvus_import import DataType, MilvusClient, MilvusException
from xcstack.vector.settings import VectorSettings
from xcstack.vector.store import (
    BackendUnavailable,
    CollectionExists,
    CollectionInfo,
    CollectionNotFound,
    Hit,
    InvalidFilter,
    InvalidVector,
    Matrix,
    Metric,
    PoolExhausted,
    Record,
)

log = logging.getLogger("xcstack.vector.milvus")
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs every RPC error with a traceback

ID_FIELD = "id"
VECTOR_FIELD = "vector"
ID_MAX_LENGTH = 256
_METRIC_TO_MILVUS = {"cosine": "COSINE", "l2": "L2", "ip": "IP"}
_METRIC_FROM_MILVUS: dict[str, Metric] = {"COSINE": "cosine", "L2": "l2", "IP": "ip"}
_UNAVAILABLE_CODES = {2, 14}  # pymilvus "Fail connecting", gRPC UNAVAILABLE
# Milvus Lite 3.x writes a segment's index file in a background thread after a flush (faiss.write_index,
# in place); a load that comes first reads it half-written: "read error in ...idx: 77 != 9872". The file
# is whole once the writer is done, so the load is retried after these pauses (seconds).
_TORN_INDEX_MARKS = ("index_read.cpp", "read error in")
LOAD_RETRY_PAUSES_S = (0.2, 0.5, 1.0, 2.0, 4.0)


class IndexFileBusy(BackendUnavailable):
    """A load read an index file Milvus Lite was still writing: retriable, and the server is not down."""
_NOT_FOUND_CODES = {4, 100}
_BAD_ARG_CODES = {6, 1100, 5}


def lite_path(settings: VectorSettings, data_dir: Path) -> str:
    return str(data_dir / "vectors" / "milvus.db")


def resolve_uri(settings: VectorSettings, data_dir: Path) -> str:
    cfg = settings.milvus
    if cfg.uri is not None:
        return cfg.uri.get_secret_value()
    if cfg.lite_mode == "side_process" or (cfg.lite_mode == "auto" and lite_port_open(cfg.lite_port)):
        return f"http://127.0.0.1:{cfg.lite_port}"
    return lite_path(settings, data_dir)


def lite_port_open(port: int, timeout: float = 0.2) -> bool:
    """Is the Milvus Lite side process listening? (the supervisor starts it before the http workers)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class MilvusStore:
    backend = "milvus"

    def __init__(self, settings: VectorSettings, data_dir: Path) -> None:
        self.settings = settings
        self.cfg = settings.milvus
        self.uri = resolve_uri(settings, data_dir)
        self.is_lite_in_process = self.uri.endswith(".db")
        self.is_lite = self.cfg.uri is None or self.is_lite_in_process
        self.pool = BlockingPool("milvus", self.cfg.pool_size, settings.acquire_timeout_s)
        self._client: MilvusClient | None = None
        self._client_lock = threading.Lock()
        self._healthy = False
        self._closing = False
        self._health_detail = "not connected yet"
        self._health_task: asyncio.Task[None] | None = None
        self._loading: dict[str, float] = {}  # collection -> start time of a load/build in progress
        self._load_task: asyncio.Task[None] | None = None
        self._load_lock = asyncio.Lock()
        self._meta: dict[str, tuple[int, Metric]] = {}

    # ---- connection -----------------------------------------------------------------------

    def _connect_blocking(self) -> MilvusClient:
        with self._client_lock:
            if self._client is None:
                if self.is_lite_in_process:
                    Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
                token = self.cfg.token.get_secret_value() if self.cfg.token else ""
                self._client = MilvusClient(
                    uri=self.uri, token=token, db_name=self.cfg.db_name, timeout=self.settings.acquire_timeout_s
                )
                log.info("milvus: connected to %s", "Milvus Lite " + self.uri if self.is_lite_in_process else "server")
            return self._client

    def _drop_client_blocking(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # the connection is already broken
                pass

    async def _call(
        self,
        op: str,
        fn_name: str,
        *args: Any,
        timeout: float | None = None,
        post: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run `client.<fn_name>(*args, **kwargs)` in the pool, mapping failures to XCErrors; `post`
        runs on the result in the same thread (pymilvus decodes results lazily: keep that off the loop)."""
        if not self._healthy:
            raise BackendUnavailable(f"milvus unavailable: {self._health_detail}")
        t = timeout if timeout is not None else self.settings.op_timeout_s
        t0 = time.perf_counter()

        def run() -> Any:
            client = self._connect_blocking()
            out = getattr(client, fn_name)(*args, timeout=t, **kwargs)
            return post(out) if post is not None else out

        try:
            out = await self.pool.run(run, timeout=t + 1.0)
        except MilvusException as exc:
            metrics.OPS.labels(self.backend, op, "error").observe(time.perf_counter() - t0)
            raise self._map(exc, args[0] if args and isinstance(args[0], str) else None, kwargs) from None
        except Exception as exc:
            metrics.OPS.labels(self.backend, op, "error").observe(time.perf_counter() - t0)
            if type(exc).__module__.startswith("grpc"):
                self._mark_down(f"{type(exc).__name__}: {exc}")
                raise BackendUnavailable(f"milvus unavailable: {exc}") from None
            raise
        metrics.OPS.labels(self.backend, op, "ok").observe(time.perf_counter() - t0)
        return out

    def _mark_down(self, detail: str) -> None:
        if self._healthy:
            log.warning("milvus down: %s", detail)
        self._healthy = False
        self._health_detail = detail
        metrics.BACKEND_UP.labels(self.backend).set(0)

    def _map(self, exc: MilvusException, collection: str | None, kwargs: dict[str, Any]) -> Exception:
        code = getattr(exc, "code", None)
        msg = str(getattr(exc, "message", "") or exc)
        low = msg.lower()
        if any(mark in low for mark in _TORN_INDEX_MARKS):  # before "unavailable": it may say EAGAIN's text
            return IndexFileBusy(f"milvus could not read an index file of {collection!r} yet: {msg}")
        if code in _UNAVAILABLE_CODES or "fail connecting" in low or "unavailable" in low:
            self._mark_down(msg)
            return BackendUnavailable(f"milvus unavailable: {msg}")
        if collection and (
            code in _NOT_FOUND_CODES or ("collection" in low and ("not exist" in low or "not found" in low))
        ):
            self._meta.pop(collection, None)
            return CollectionNotFound(collection)
        if code == 101 or "not loaded" in low:
            return BackendUnavailable(f"collection {collection!r} is not loaded yet (index loading); retry shortly")
        if "already exist" in low:
            return CollectionExists(collection or "?")
        if kwargs.get("filter") and (code in _BAD_ARG_CODES or "expr" in low or "filter" in low or "parse" in low):
            return InvalidFilter(msg)
        if code in _BAD_ARG_CODES:
            return InvalidVector(f"milvus rejected the request: {msg}")
        return exc

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self._reconnect()
        self._health_task = asyncio.create_task(self._health_loop(), name="xc-vector-milvus-health")

    async def _reconnect(self) -> None:
        try:
            await self.pool.run(self._drop_client_blocking, timeout=self.settings.acquire_timeout_s + 5)
            await self.pool.run(self._connect_blocking, timeout=self.settings.acquire_timeout_s + 10)
            await self.pool.run(self._ping_blocking, timeout=self.settings.acquire_timeout_s + 1)
        except PoolExhausted:
            return  # busy is not down; try again at the next health tick
        except Exception as exc:
            self._mark_down(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")
            return
        self._healthy = True
        self._health_detail = "ok"
        metrics.BACKEND_UP.labels(self.backend).set(1)
        log.info("milvus up")
        if self.cfg.load_on_start and not self._closing:
            self._load_task = asyncio.create_task(self._load_all(), name="xc-vector-milvus-load")

    def _ping_blocking(self) -> None:
        client = self._connect_blocking()
        client.list_collections(timeout=self.settings.acquire_timeout_s)

    async def _health_loop(self) -> None:
        slow = 0
        while not self._closing:
            await asyncio.sleep(self.settings.health_interval_s)
            if not self._healthy:
                await self._reconnect()
                continue
            try:
                await self.pool.run(self._ping_blocking, timeout=self.settings.acquire_timeout_s + 1)
                slow = 0
            except asyncio.CancelledError:
                raise
            except PoolExhausted:
                continue  # busy is not down
            except Exception as exc:
                detail = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                refused = _is_unreachable(exc)
                slow = 0 if refused else slow + 1
                # refused/unreachable: down at once; slow (an index load keeps Lite busy): after 3 in a row
                if refused or slow >= 3:
                    self._mark_down(detail)
                    await self._reconnect()
                else:
                    log.info("milvus: slow health check (%d): %s", slow, detail)

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait([self._health_task, self._load_task])
        try:
            await self.pool.run(self._drop_client_blocking, timeout=5)
            if self.is_lite_in_process:
                await self.pool.run(self.stop_lite_server, timeout=10)
        except Exception:
            pass
        self.pool.shutdown()

    def stop_lite_server(self) -> None:
        """Stop the in-process Milvus Lite server (blocking; at close, and in fault tests)."""
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(self.uri)

    async def health(self) -> tuple[bool, str]:
        if not self._healthy:
            return False, self._health_detail
        if self._loading:
            now = time.monotonic()
            busy = ", ".join(f"{n} ({now - t:.0f}s)" for n, t in sorted(self._loading.items()))
            return True, f"ok; loading/indexing: {busy}"
        return True, "ok"

    def loading(self) -> dict[str, float]:
        now = time.monotonic()
        return {n: now - t for n, t in self._loading.items()}

    async def _load_all(self) -> None:
        try:
            names = await self._call("list", "list_collections")
            for name in names:
                state = await self._call("load_state", "get_load_state", name)
                if "Loaded" not in str(state.get("state")):
                    await self._load(name, rebuild=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("milvus: loading collections at start failed: %s", getattr(exc, "message", exc))

    async def _load(self, name: str, *, rebuild: bool) -> None:
        """flush (+ release) + load, with progress in the log every 5 s."""
        async with self._load_lock:
            started = time.monotonic()
            self._loading[name] = started
            log.info("milvus: %s %s", "building index of" if rebuild else "loading", name)

            async def progress() -> None:
                while True:
                    await asyncio.sleep(5)
                    log.info(
                        "milvus: still %s %s (%.0fs)",
                        "indexing" if rebuild else "loading",
                        name,
                        time.monotonic() - started,
                    )

            ticker = asyncio.create_task(progress())
            budget = max(self.settings.op_timeout_s, 3600.0)
            try:
                if rebuild:
                    await self._call("flush", "flush", name)
                    await self._call("release", "release_collection", name)
                for pause in (*LOAD_RETRY_PAUSES_S, None):
                    try:
                        await self._call("load", "load_collection", name, timeout=budget)
                        break
                    except IndexFileBusy as exc:
                        if pause is None:
                            raise
                        log.warning("milvus: %s; loading %s again in %.1fs", exc.message, name, pause)
                        await asyncio.sleep(pause)
            finally:
                ticker.cancel()
                self._loading.pop(name, None)
            dt = time.monotonic() - started
            metrics.INDEX_BUILD.labels(self.backend).observe(dt)
            log.info("milvus: %s ready in %.1fs", name, dt)

    # ---- collections ----------------------------------------------------------------------

    async def create_collection(
        self, name: str, dimension: int, metric: Metric, description: str = ""
    ) -> CollectionInfo:
        if await self._call("has", "has_collection", name):
            raise CollectionExists(name)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True, description=description)
        schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
        index_params = MilvusClient.prepare_index_params()
        index_params.add_index(
            field_name=VECTOR_FIELD,
            index_type=self.cfg.index_type,
            metric_type=_METRIC_TO_MILVUS[metric],
            params=self._build_params(),
        )
        await self._call(
            "create", "create_collection", name, schema=schema, index_params=index_params, consistency_level="Strong"
        )
        self._meta[name] = (dimension, metric)
        log.info("milvus: created collection %s (dim %d, %s, %s)", name, dimension, metric, self.cfg.index_type)
        return await self.describe_collection(name)

    def _build_params(self) -> dict[str, Any]:
        if self.cfg.index_type == "HNSW":
            return {"M": self.cfg.m, "efConstruction": self.cfg.ef_construction}
        if self.cfg.index_type == "IVF_FLAT":
            return {"nlist": 1024}
        return {}

    def _search_params(self, metric: Metric, ef: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.cfg.index_type == "HNSW":
            params["ef"] = ef or self.cfg.ef_search
        elif self.cfg.index_type == "IVF_FLAT":
            params["nprobe"] = ef or 16
        return {"metric_type": _METRIC_TO_MILVUS[metric], "params": params}

    async def list_collections(self) -> list[str]:
        return sorted(await self._call("list", "list_collections"))

    async def _collection_meta(self, name: str) -> tuple[int, Metric]:
        cached = self._meta.get(name)
        if cached is not None:
            return cached
        desc = await self._call("describe", "describe_collection", name)
        dim = next(int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == VECTOR_FIELD)
        idx = await self._call("describe_index", "describe_index", name, VECTOR_FIELD)
        metric = _METRIC_FROM_MILVUS.get(str((idx or {}).get("metric_type", "COSINE")).upper(), "cosine")
        self._meta[name] = (dim, metric)
        return dim, metric

    async def describe_collection(self, name: str) -> CollectionInfo:
        desc = await self._call("describe", "describe_collection", name)
        dim, metric = await self._collection_meta(name)
        idx = await self._call("describe_index", "describe_index", name, VECTOR_FIELD) or {}
        load = await self._call("load_state", "get_load_state", name)
        count = await self.count(name)
        building = name in self._loading
        state = "building" if building else ("ready" if "Loaded" in str(load.get("state")) else "not_loaded")
        index = {
            "type": idx.get("index_type", self.cfg.index_type),
            "params": {k: v for k, v in idx.items() if k in ("M", "efConstruction", "nlist")},
            "ef_search": self.cfg.ef_search,
            "state": state,
            "load_state": str(load.get("state", "")).removeprefix("LoadState."),
            "indexed_rows": idx.get("indexed_rows"),
            "pending_rows": idx.get("pending_index_rows"),
        }
        if building:
            index["building_for_s"] = round(time.monotonic() - self._loading[name], 1)
        return CollectionInfo(name, dim, metric, count, desc.get("description", ""), index)

    async def drop_collection(self, name: str) -> None:
        if not await self._call("has", "has_collection", name):
            raise CollectionNotFound(name)
        await self._call("drop", "drop_collection", name)
        self._meta.pop(name, None)
        log.info("milvus: dropped collection %s", name)

    async def count(self, name: str) -> int:
        res = await self._call("count", "query", name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    # ---- rows -----------------------------------------------------------------------------

    async def upsert(self, name: str, ids: Sequence[str], vectors: Matrix, payloads: Sequence[dict[str, Any]]) -> int:
        dim, _ = await self._collection_meta(name)
        if vectors.shape[1] != dim:
            raise InvalidVector(f"vectors have dimension {vectors.shape[1]}; collection {name!r} has {dim}")
        rows = [{**p, ID_FIELD: i, VECTOR_FIELD: v} for i, v, p in zip(ids, vectors, payloads, strict=True)]
        # Milvus Lite's upsert merges new fields onto the old row; its insert replaces the row (newest
        # sequence wins). A Milvus server's upsert replaces; its insert would keep duplicates.
        res = await self._call("upsert", "insert" if self.is_lite else "upsert", name, rows)
        metrics.ROWS.labels(self.backend, "upsert").inc(len(ids))
        if isinstance(res, dict):
            n = res.get("upsert_count", res.get("insert_count"))
            return int(n) if n is not None else len(ids)
        return len(ids)

    async def delete(self, name: str, ids: Sequence[str] | None = None, filter: str | None = None) -> int | None:
        if ids is None and not filter:
            raise InvalidVector("delete needs ids or a filter", param="ids")
        await self._collection_meta(name)
        expr_parts = []
        if ids is not None:
            expr_parts.append(f"{ID_FIELD} in {_milvus_list(ids)}")
        if filter:
            expr_parts.append(f"({filter})")
        res = await self._call("delete", "delete", name, filter=" and ".join(expr_parts))
        n = res.get("delete_count") if isinstance(res, dict) else None
        if n is None and isinstance(res, list):
            n = len(res)
        if n is not None:
            metrics.ROWS.labels(self.backend, "delete").inc(n)
        return n

    async def search(
        self,
        name: str,
        vectors: Matrix,
        top_k: int,
        *,
        filter: str | None = None,
        output_fields: Sequence[str] | None = None,
        include_vectors: bool = False,
        ef: int | None = None,
    ) -> list[list[Hit]]:
        dim, metric = await self._collection_meta(name)
        if vectors.shape[1] != dim:
            raise InvalidVector(f"query vector has dimension {vectors.shape[1]}; collection {name!r} has {dim}")
        all_fields = output_fields is not None and "*" in output_fields
        fields = [] if output_fields is None or all_fields else list(output_fields)
        out_fields: list[str] = (["*"] if all_fields else fields) + ([VECTOR_FIELD] if include_vectors else [])
        want_vectors = include_vectors

        def build(res: Any) -> list[list[Hit]]:
            """Runs in the pool thread: decoding the result is real work (pymilvus decodes lazily)."""
            results: list[list[Hit]] = []
            for row_hits in res:
                hits = []
                for h in row_hits:
                    entity = dict(h.get("entity") or {})
                    vec = entity.pop(VECTOR_FIELD, None)
                    entity.pop(ID_FIELD, None)
                    score = float(h["distance"])
                    if metric == "l2":
                        score = math.sqrt(max(score, 0.0))  # Milvus reports squared L2
                    payload: dict[str, Any] | None = None
                    if all_fields:
                        payload = entity
                    elif fields:
                        payload = {f: entity[f] for f in fields if f in entity}
                    hits.append(
                        Hit(
                            str(h.get("id", h.get(ID_FIELD))),
                            score,
                            payload,
                            [float(x) for x in vec] if want_vectors and vec is not None else None,
                        )
                    )
                results.append(hits)
            return results

        found: list[list[Hit]] = await self._call(
            "search",
            "search",
            name,
            data=list(vectors),
            limit=top_k,
            filter=filter or "",
            output_fields=out_fields or None,
            search_params=self._search_params(metric, ef),
            anns_field=VECTOR_FIELD,
            post=build,
        )
        return found

    async def export(
        self, name: str, *, batch_size: int = 1000, filter: str | None = None, include_vectors: bool = True
    ) -> AsyncGenerator[list[Record], None]:
        await self._collection_meta(name)
        fields = ["*"] + ([VECTOR_FIELD] if include_vectors else [])
        it = await self._call(
            "export", "query_iterator", name, batch_size=batch_size, filter=filter or "", output_fields=fields
        )
        try:
            while True:
                try:
                    batch = await self.pool.run(it.next, timeout=self.settings.op_timeout_s)
                except MilvusException as exc:  # e.g. the collection was dropped meanwhile: a clear code
                    raise self._map(exc, name, {"filter": filter}) from None
                if not batch:
                    return
                out = []
                for row in batch:
                    row = dict(row)
                    rid = str(row.pop(ID_FIELD))
                    vec = row.pop(VECTOR_FIELD, None)
                    out.append(
                        Record(rid, row, [float(x) for x in vec] if include_vectors and vec is not None else None)
                    )
                yield out
        finally:
            try:
                await self.pool.run(it.close, timeout=5)
            except Exception:
                pass

    async def build_index(self, name: str) -> CollectionInfo:
        if not await self._call("has", "has_collection", name):
            raise CollectionNotFound(name)
        await self._load(name, rebuild=True)
        return await self.describe_collection(name)


def _is_unreachable(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    text = str(getattr(exc, "message", "") or exc).lower()
    return code in _UNAVAILABLE_CODES or "fail connecting" in text or "unavailable" in text or "refused" in text


def _milvus_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_milvus_str(v) for v in values) + "]"


def _milvus_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
