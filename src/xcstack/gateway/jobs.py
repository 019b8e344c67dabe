"""Async jobs: `POST /v1/jobs` queues any non-streamed gateway request, `GET /v1/jobs/{id}` reads
its status and result, `DELETE /v1/jobs/{id}` cancels it.

Jobs live in the state store (`ctx.state`: SQLite by default, PostgreSQL when configured), so a
restart loses no queued or finished job. Each http worker runs at most `jobs.concurrency` jobs; a
job is claimed atomically (`UPDATE ... WHERE status='queued'`), holds a lease renewed while it
runs, and is requeued when its worker dies (lease expired). Finished jobs expire after `ttl_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.errors import NotFound, Overloaded, XCError
from xcstack.gateway import metrics
from xcstack.gateway import protocol as p
from xcstack.gateway.service import ENDPOINTS, GatewayService, _Stop, key_id
from xcstack.gateway.settings import JobSettings
from xcstack.gateway.watchdog import Watchdog
from xcstack.httputil import JSONResponse, dumps, loads, read_json
from xcstack.security.guard import authorize
from xcstack.state.store import StateStore, Tx

log = logging.getLogger("xcstack.gateway.jobs")

NAMESPACE = "gateway"
MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS gateway_jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        body TEXT NOT NULL,
        metadata TEXT,
        status TEXT NOT NULL,
        http_status INTEGER,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        worker TEXT,
        lease_until DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION
    );
    CREATE INDEX IF NOT EXISTS gateway_jobs_status ON gateway_jobs (status, created_at);
    CREATE INDEX IF NOT EXISTS gateway_jobs_expires ON gateway_jobs (expires_at)
    """,
]
FINAL = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3


Handler = Callable[[Request], Awaitable[Response]]


def _json_errors(fn: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except XCError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    wrapped.__name__ = fn.__name__
    return wrapped


class JobManager:
    def __init__(self, service: GatewayService, store: StateStore, settings: JobSettings) -> None:
        self.service = service
        self.store = store
        self.settings = settings
        self.worker = secrets.token_hex(6)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._last_sweep = 0.0
        self._last_maintain = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.migrate(NAMESPACE, MIGRATIONS)
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks = [asyncio.create_task(self._dispatch_loop()), asyncio.create_task(self._lease_loop())]

    async def stop(self) -> None:
        self._stopping = True
        ids = list(self._running)
        for t in self._tasks:
            t.cancel()
        running = list(self._running.values())
        for t in running:
            t.cancel()
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)
        self._tasks = []
        # Jobs interrupted by shutdown go back to the queue at once (no lease wait).
        self._running.clear()
        if ids:
            with contextlib.suppress(Exception):
                await self._requeue(ids)

    async def _requeue(self, ids: list[str]) -> None:
        def tx(t: Tx) -> None:
            for job_id in ids:
                t.execute("UPDATE gateway_jobs SET status='queued', worker=NULL, lease_until=NULL "
                          "WHERE id=? AND status='running' AND worker=?", (job_id, self.worker))

        await self.store.transaction(tx)

    # -- dispatch -------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            try:
                await self._maintain()
                while len(self._running) < self.settings.concurrency:
                    job = await self._claim()
                    if job is None:
                        break
                    task = asyncio.create_task(self._run(job))
                    self._running[job["id"]] = task
                    task.add_done_callback(self._on_done(job["id"]))
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the loop alive; the store may be briefly unavailable
                log.exception("job dispatch failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_s):
                    await self._wake.wait()

    def _on_done(self, job_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._running.pop(job_id, None)
            self._wake.set()

        return done

    async def _maintain(self) -> None:
        """Requeue jobs whose worker went silent (every lease/2); delete expired jobs (once a minute)."""
        now = time.time()
        if now - self._last_maintain < min(5.0, self.settings.lease_s / 2):
            return
        self._last_maintain = now

        def tx(t: Tx) -> None:
            t.execute("UPDATE gateway_jobs SET status='queued', worker=NULL, lease_until=NULL "
                      "WHERE status='running' AND lease_until < ?", (now,))
            if now - self._last_sweep > 60:
                t.execute("DELETE FROM gateway_jobs WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))

        await self.store.transaction(tx)
        if now - self._last_sweep > 60:
            self._last_sweep = now

    async def _claim(self) -> dict[str, Any] | None:
        now = time.time()
        lease = now + self.settings.lease_s

        def tx(t: Tx) -> dict[str, Any] | None:
            for _ in range(5):
                row = t.fetchone("SELECT id FROM gateway_jobs WHERE status='queued' ORDER BY created_at LIMIT 1")
                if row is None:
                    return None
                n = t.execute(
                    "UPDATE gateway_jobs SET status='running', worker=?, lease_until=?, started_at=?, "
                    "attempts=attempts+1 WHERE id=? AND status='queued'",
                    (self.worker, lease, now, row["id"]),
                )
                if n == 1:
                    return t.fetchone("SELECT * FROM gateway_jobs WHERE id=?", (row["id"],))
            return None

        return await self.store.transaction(tx)

    async def _lease_loop(self) -> None:
        interval = max(0.2, self.settings.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._running)
            if not ids:
                continue
            lease = time.time() + self.settings.lease_s

            def tx(t: Tx, ids: list[str] = ids, lease: float = lease) -> list[str]:
                cancelled = []
                for job_id in ids:
                    if t.execute("UPDATE gateway_jobs SET lease_until=? WHERE id=? AND status='running' AND worker=?",
                                 (lease, job_id, self.worker)) == 0:
                        cancelled.append(job_id)
                return cancelled

            try:
                gone = await self.store.transaction(tx)
            except Exception:
                log.exception("job lease renewal failed")
                continue
            for job_id in gone:  # cancelled (or taken over) elsewhere: stop working on it
                task = self._running.get(job_id)
                if task is not None:
                    task.cancel()

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        endpoint = ENDPOINTS[job["endpoint"]]
        body = loads(job["body"])
        body["stream"] = False
        body.pop("stream_options", None)
        status = "failed"
        http_status: int | None = None
        result: bytes | None = None
        error: bytes | None = None
        wd = Watchdog()
        try:
            pr = self.service.prepare_data(endpoint, body, dumps(body), job["owner"])
            if not self.service.router.has(pr.model, endpoint.path == "/v1/embeddings"):
                raise NotFound(f"model {pr.model!r} is not served here", code=p.MODEL_NOT_FOUND)
            http_status, payload = await self.service.complete(pr, wd)
            if http_status < 400:
                status, result = "succeeded", payload
            else:
                error = payload
        except asyncio.CancelledError:
            if wd.take() is None:
                # Cancelled by DELETE (already recorded) or by shutdown (stop() requeues it).
                await wd.close()
                raise
        except _Stop as stop:
            error = dumps({"error": {"type": "server_error", "code": p.UPSTREAM_TIMEOUT,
                                     "message": f"job stopped: {stop.reason}"}})
            http_status = 504
        except Overloaded as err:
            if job["attempts"] < MAX_ATTEMPTS:
                await wd.close()
                await self._requeue([job_id])
                return
            http_status, error = err.status, dumps(err.body())
        except XCError as err:
            http_status, error = err.status, dumps(err.body())
        except Exception as exc:  # a bug must not kill the runner
            log.exception("job %s crashed", job_id)
            http_status = 500
            error = dumps({"error": {"type": "server_error", "code": "internal_error", "message": type(exc).__name__}})
        await wd.close()
        await self._finish(job_id, status, http_status, result, error)

    async def _finish(self, job_id: str, status: str, http_status: int | None, result: bytes | None,
                      error: bytes | None) -> None:
        now = time.time()
        expires = now + self.settings.ttl_s
        n = await self.store.execute(
            "UPDATE gateway_jobs SET status=?, http_status=?, result=?, error=?, finished_at=?, expires_at=?, "
            "lease_until=NULL WHERE id=? AND status='running' AND worker=?",
            (status, http_status, result.decode() if result else None, error.decode() if error else None,
             now, expires, job_id, self.worker),
        )
        if n:
            metrics.JOBS.labels(status).inc()

    # -- API ------------------------------------------------------------------------------------
    async def submit(self, owner: str, data: Any, request: Request | None = None) -> dict[str, Any]:
        from xcstack.httputil import parse_model

        req = parse_model(data, p.JobCreate)
        endpoint = ENDPOINTS[req.endpoint]
        body = dict(req.body)
        body["stream"] = False
        body.pop("stream_options", None)
        pr = self.service.prepare_data(endpoint, body, b"", owner)
        if not self.service.router.has(pr.model, endpoint.path == "/v1/embeddings"):
            raise NotFound(f"model {pr.model!r} is not served by an upstream; see GET /v1/models",
                           code=p.MODEL_NOT_FOUND, param="body.model")
        if request is not None:
            await authorize(request, f"model:{pr.model}", "invoke")
        await self.service.limiter.check(owner, pr.estimate)
        now = time.time()
        job_id = "job_" + secrets.token_hex(12)
        limit = self.settings.max_queued

        def tx(t: Tx) -> bool:
            row = t.fetchone("SELECT COUNT(*) AS n FROM gateway_jobs WHERE status='queued'")
            if row is not None and int(row["n"]) >= limit:
                return False
            t.execute(
                "INSERT INTO gateway_jobs (id, owner, endpoint, body, metadata, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, owner, req.endpoint, dumps(body).decode(),
                 dumps(req.metadata).decode() if req.metadata else None, now),
            )
            return True

        if not await self.store.transaction(tx):
            raise Overloaded(f"the job queue is full ({limit} queued jobs)", code=p.JOBS_FULL, retry_after=5)
        self._wake.set()
        return {"id": job_id, "object": "job", "status": "queued", "endpoint": req.endpoint, "created_at": now,
                "metadata": req.metadata}

    async def get(self, owner: str, job_id: str) -> dict[str, Any]:
        row = await self.store.fetchone("SELECT * FROM gateway_jobs WHERE id=? AND owner=?", (job_id, owner))
        if row is None or (row["expires_at"] is not None and row["expires_at"] < time.time()):
            raise NotFound(f"job {job_id!r} not found (or expired)", code=p.JOB_NOT_FOUND)
        return self._view(row)

    async def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        now = time.time()
        err = dumps({"error": {"type": "cancelled", "code": "cancelled", "message": "job cancelled"}}).decode()
        n = await self.store.execute(
            "UPDATE gateway_jobs SET status='cancelled', error=?, finished_at=?, expires_at=?, lease_until=NULL "
            "WHERE id=? AND owner=? AND status IN ('queued', 'running')",
            (err, now, now + self.settings.ttl_s, job_id, owner),
        )
        if n:
            metrics.JOBS.labels("cancelled").inc()
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()
        return await self.get(owner, job_id)

    async def list_jobs(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.store.fetchall(
            "SELECT * FROM gateway_jobs WHERE owner=? AND (expires_at IS NULL OR expires_at >= ?) "
            "ORDER BY created_at DESC LIMIT ?", (owner, time.time(), limit))
        return [self._view(r, with_result=False) for r in rows]

    def _view(self, row: dict[str, Any], with_result: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": row["id"], "object": "job", "status": row["status"], "endpoint": row["endpoint"],
            "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
            "expires_at": row["expires_at"], "attempts": row["attempts"], "http_status": row["http_status"],
            "metadata": loads(row["metadata"]) if row["metadata"] else None,
        }
        if with_result:
            out["result"] = loads(row["result"]) if row["result"] else None
            out["error"] = loads(row["error"]).get("error") if row["error"] else None
        return out

    def routes(self) -> list[BaseRoute]:
        @_json_errors
        async def create_job(request: Request) -> Response:
            data = await read_json(request)
            job = await self.submit(key_id(request.scope), data, request)
            return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})

        @_json_errors
        async def get_job(request: Request) -> Response:
            return JSONResponse(await self.get(key_id(request.scope), request.path_params["job_id"]))

        @_json_errors
        async def delete_job(request: Request) -> Response:
            return JSONResponse(await self.cancel(key_id(request.scope), request.path_params["job_id"]))

        @_json_errors
        async def list_jobs(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": await self.list_jobs(key_id(request.scope))})

        return [
            Route("/v1/jobs", create_job, methods=["POST"]),
            Route("/v1/jobs", list_jobs, methods=["GET"]),
            Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
        ]


def disabled_routes() -> list[BaseRoute]:
    async def off(request: Request) -> Response:
        err = NotFound("async jobs are disabled ([gateway.jobs] enabled = false)", code=p.JOBS_DISABLED)
        return JSONResponse(err.body(), status_code=err.status)

    return [Route("/v1/jobs", off, methods=["GET", "POST"]), Route("/v1/jobs/{job_id}", off, methods=["GET", "DELETE"])]
