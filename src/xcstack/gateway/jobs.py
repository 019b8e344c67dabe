"""Async jobs: `POST /v1/jobs` queues any non-streamed gateway request, `GET /v1/jobs/{id}` reads
its status and result, `DELETE /v1/jobs/{id}` cancels it.

Jobs live in a `JobStore` (`jobstore/`): the state store by default (`ctx.state`: SQLite, or
PostgreSQL/KingbaseES with `[state] url`), or Redis with `[gateway.jobs] store = "redis"`
(`jobstore/redis.py`), so a restart loses no queued or finished job. Each http worker runs at most
`jobs.concurrency` jobs; a job is claimed atomically (oldest first), holds a lease renewed while it
runs, and is requeued when its worker dies (lease expired). Finished jobs expire after `ttl_s`.

When the store is unavailable (a Redis or database outage) the loops keep retrying, with one WARNING
per outage. A job that finishes meanwhile keeps its outcome in memory (it holds its slot, so at most
`concurrency` of them) and stores it once the store is back; its lease is renewed as soon as the store
answers, and no node that saw the outage requeues a lapsed lease for a lease period after it, so the
upstream call is not paid for twice while this worker lives.
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

from xcstack.apidoc import api
from xcstack.errors import CoreCode, NotFound, Overloaded, XCError
from xcstack.gateway import metrics
from xcstack.gateway import protocol as p
from xcstack.gateway.asgi import key_id
from xcstack.gateway.failover import Stopped
from xcstack.gateway.jobstore import JobStore
from xcstack.gateway.prepare import ENDPOINTS
from xcstack.gateway.protocol import GatewayCode
from xcstack.gateway.service import GatewayService
from xcstack.gateway.settings import JobSettings
from xcstack.gateway.watchdog import Watchdog
from xcstack.httputil import JSONResponse, dumps, loads, read_json
from xcstack.security.guard import authorize, requires_route

log = logging.getLogger("xcstack.gateway.jobs")

MAX_ATTEMPTS = 3
STORE_RETRY_MAX_S = 5.0  # longest wait between two tries to store a finished job's outcome


Handler = Callable[[Request], Awaitable[Response]]
_JOB_CHECKS = "Also `invoke` on `model:<model>` of the body, checked before the model is looked up."
_OWN = "Jobs are private to the key (or user) that submitted them: another caller's job id answers 404 `job_not_found`."


def _json_errors(fn: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except XCError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    wrapped.__name__ = fn.__name__
    return wrapped


class JobManager:
    def __init__(self, service: GatewayService, store: JobStore, settings: JobSettings) -> None:
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
        self._store_down = False  # a store call failed and none succeeded since
        self._store_back = asyncio.Event()  # set (and replaced) when the store answers again
        self._requeue_after = 0.0  # no lapsed-lease requeue before this (a lease period after an outage)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start()
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
                await self.store.requeue(self.worker, ids)
        await self.store.close()

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
            except Exception as exc:  # keep the loop alive; the store may be briefly unavailable
                self._store_failed("job dispatch", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_s):
                    await self._wake.wait()

    def _on_done(self, job_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._running.pop(job_id, None)
            self._wake.set()
            # Retrieved here, so a runner's failure is logged once, never as "Task exception was never retrieved".
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                log.error("job %s runner failed", job_id, exc_info=exc)

        return done

    def _store_failed(self, what: str, exc: Exception) -> None:
        """A store call failed: one WARNING per outage (the loops retry every poll), no traceback for
        an unavailable store; later failures of the same outage log at DEBUG."""
        if self._store_down:
            log.debug("%s failed: job store still unavailable (%s)", what, exc)
            return
        self._store_down = True
        log.warning("%s failed (%s); the job store is retried until it answers", what, exc,
                    exc_info=None if isinstance(exc, XCError) else exc)

    def _store_ok(self) -> None:
        """A store call succeeded. After an outage, other live workers need a renewal round before their
        lapsed leases can be told from dead ones: hold the requeue of lapsed leases for one lease period."""
        if not self._store_down:
            return
        self._store_down = False
        self._requeue_after = time.time() + self.settings.lease_s
        self._store_back.set()
        self._store_back = asyncio.Event()
        log.info("job store reachable again")

    async def _maintain(self) -> None:
        """Requeue jobs whose worker went silent (every lease/2); delete expired jobs (once a minute).
        Not while the store is down, nor for a lease period after (see `_store_ok`)."""
        now = time.time()
        if (self._store_down or now < self._requeue_after
                or now - self._last_maintain < min(5.0, self.settings.lease_s / 2)):
            return
        self._last_maintain = now
        sweep = now - self._last_sweep > 60
        await self.store.maintain(now, sweep)
        self._store_ok()
        if sweep:
            self._last_sweep = now

    async def _claim(self) -> dict[str, Any] | None:
        now = time.time()
        job = await self.store.claim(self.worker, now, now + self.settings.lease_s)
        self._store_ok()
        return job

    async def _lease_loop(self) -> None:
        interval = max(0.2, self.settings.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._running)
            if not ids:
                continue
            try:
                gone = await self.store.renew(self.worker, ids, time.time() + self.settings.lease_s)
            except Exception as exc:
                self._store_failed("job lease renewal", exc)
                continue
            self._store_ok()
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
                raise NotFound(f"model {pr.model!r} is not served here", code=CoreCode.MODEL_NOT_FOUND)
            http_status, payload = await self.service.complete(pr, wd)
            if http_status >= 400:
                error = payload
            elif _json_object(payload):
                status, result = "succeeded", payload
            else:  # stored results are served as JSON objects: an upstream that answered anything else failed
                http_status = 502
                error = dumps({"error": {"type": "server_error", "code": CoreCode.UPSTREAM_ERROR,
                                         "message": "the upstream's answer is not a JSON object"}})
        except asyncio.CancelledError:
            if wd.take() is None:
                # Cancelled by DELETE (already recorded) or by shutdown (stop() requeues it).
                await wd.close()
                raise
        except Stopped as stop:
            error = dumps({"error": {"type": "server_error", "code": CoreCode.UPSTREAM_TIMEOUT,
                                     "message": f"job stopped: {stop.reason}"}})
            http_status = 504
        except Overloaded as err:
            if job["attempts"] < MAX_ATTEMPTS:
                await wd.close()
                try:
                    await self.store.requeue(self.worker, [job_id])
                except Exception as exc:  # its lease lapses and the job is requeued then
                    self._store_failed(f"requeue of job {job_id}", exc)
                return
            http_status, error = err.status, dumps(err.body())
        except XCError as err:
            http_status, error = err.status, dumps(err.body())
        except Exception as exc:  # a bug must not kill the runner
            log.exception("job %s crashed", job_id)
            http_status = 500
            error = dumps({"error": {"type": "server_error",
                                     "code": CoreCode.INTERNAL_ERROR, "message": type(exc).__name__}})
        await wd.close()
        await self._finish(job_id, status, http_status, result, error)

    async def _finish(self, job_id: str, status: str, http_status: int | None, result: bytes | None,
                      error: bytes | None) -> None:
        """Store the outcome; while the store is unavailable, keep it and retry with backoff (sooner when
        the store answers again). The job stays in `_running`, so its slot bounds what is kept in memory
        and the lease loop renews its lease; a DELETE or a takeover (renewal says gone) cancels it."""
        delay = 0.1
        kept = False
        while True:
            now = time.time()
            try:
                stored = await self.store.finish(self.worker, job_id, status, http_status,
                                                 result.decode() if result else None,
                                                 error.decode() if error else None, now, now + self.settings.ttl_s)
            except Exception as exc:
                self._store_failed(f"storing the outcome of job {job_id}", exc)
                if not kept:
                    kept = True
                    log.warning("job %s finished (%s); its outcome is kept in memory until the job store is back",
                                job_id, status)
                back = self._store_back
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await back.wait()
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                continue
            self._store_ok()
            if stored:
                metrics.JOBS.labels(status).inc()
            if kept:
                log.info("job %s: outcome stored after the job store outage", job_id)
            return

    # -- API ------------------------------------------------------------------------------------
    async def submit(self, owner: str, data: Any, request: Request | None = None) -> dict[str, Any]:
        from xcstack.httputil import parse_model

        req = parse_model(data, p.JobCreate)
        endpoint = ENDPOINTS[req.endpoint]
        body = dict(req.body)
        body["stream"] = False
        body.pop("stream_options", None)
        pr = self.service.prepare_data(endpoint, body, b"", owner)
        if request is not None:  # permission first: no 404 that tells a caller without it which models exist
            await authorize(request, f"model:{pr.model}", "invoke")
        if not self.service.router.has(pr.model, endpoint.path == "/v1/embeddings"):
            raise NotFound(f"model {pr.model!r} is not served by an upstream; see GET /v1/models",
                           code=CoreCode.MODEL_NOT_FOUND, param="body.model")
        await self.service.limiter.check(owner, pr.estimate)
        now = time.time()
        job_id = "job_" + secrets.token_hex(12)
        limit = self.settings.max_queued
        if not await self.store.submit(job_id, owner, req.endpoint, dumps(body).decode(),
                                       dumps(req.metadata).decode() if req.metadata else None, now, limit):
            raise Overloaded(f"the job queue is full ({limit} queued jobs)", code=GatewayCode.JOBS_FULL, retry_after=5)
        self._wake.set()
        return {"id": job_id, "object": "job", "status": "queued", "endpoint": req.endpoint, "created_at": now,
                "metadata": req.metadata}

    async def get(self, owner: str, job_id: str) -> dict[str, Any]:
        row = await self.store.get(owner, job_id, time.time())
        if row is None:
            raise NotFound(f"job {job_id!r} not found (or expired)", code=GatewayCode.JOB_NOT_FOUND)
        return self._view(row)

    async def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        now = time.time()
        err = dumps({"error": {"type": "cancelled",
                               "code": GatewayCode.CANCELLED, "message": "job cancelled"}}).decode()
        # The store checks the owner: only a cancel it accepted stops the local runner (another user's
        # DELETE answers 404 and leaves the job alone). A job cancelled elsewhere is stopped by its
        # worker's next lease renewal.
        if await self.store.cancel(owner, job_id, err, now, now + self.settings.ttl_s):
            metrics.JOBS.labels("cancelled").inc()
            task = self._running.get(job_id)
            if task is not None:
                task.cancel()
        return await self.get(owner, job_id)

    async def list_jobs(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.store.list_owned(owner, time.time(), limit)
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
        @requires_route
        @api("Queue a non-streamed gateway request as an async job (202 + `Location: /v1/jobs/{id}`)",
             body=p.JobCreate, response=p.JobSummary, status=202, errors=(404,), checks=_JOB_CHECKS,
             description="The `body` is validated as the endpoint would validate it (400); `stream` is forced off. "
                         "404 `model_not_found` when no upstream serves the model; 503 `jobs_full` when "
                         "`jobs.max_queued` jobs wait, `jobs_store_unavailable` while the job store is down.")
        @_json_errors
        async def create_job(request: Request) -> Response:
            data = await read_json(request)
            job = await self.submit(key_id(request.scope), data, request)
            return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})

        @requires_route
        @api("One of the caller's jobs: its status, and its result or error once finished", response=p.Job,
             errors=(404,), description=_OWN)
        @_json_errors
        async def get_job(request: Request) -> Response:
            return JSONResponse(await self.get(key_id(request.scope), request.path_params["job_id"]))

        @requires_route
        @api("Cancel one of the caller's jobs (queued: it never runs; running: its upstream call is cancelled)",
             response=p.Job, errors=(404,), description=_OWN + " A finished job is answered unchanged.")
        @_json_errors
        async def delete_job(request: Request) -> Response:
            return JSONResponse(await self.cancel(key_id(request.scope), request.path_params["job_id"]))

        @requires_route
        @api("The caller's jobs, newest first (without results)", response=p.JobList, description=_OWN)
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
    @requires_route
    @api("Async jobs are disabled on this node: every call answers 404 `jobs_disabled`", status=404, errors=(404,))
    async def off(request: Request) -> Response:
        err = NotFound("async jobs are disabled ([gateway.jobs] enabled = false)", code=GatewayCode.JOBS_DISABLED)
        return JSONResponse(err.body(), status_code=err.status)

    return [Route("/v1/jobs", off, methods=["GET", "POST"]), Route("/v1/jobs/{job_id}", off, methods=["GET", "DELETE"])]


def _json_object(payload: bytes) -> bool:
    try:
        return isinstance(loads(payload), dict)
    except ValueError:
        return False
