"""`GET /v1/system/processes`: the process tree as the supervisor publishes it, from any http worker.

Read-only, for the system administrator (`system:read`). The supervisor's table is a small local file
(`table.py`), read per request (well under a millisecond); without one — an app built by a test or
run under another server, or a file that cannot be read — the answer describes this process alone,
with a note why, and is never an error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.httputil import JSONResponse
from xcstack.security.guard import requires
from xcstack.system.protocol import ProcessEntry, ProcessTable, Worker
from xcstack.system.table import STATUS_ENV, read_table

STARTED_AT = time.time()  # this process's start, near enough: imported while the app is built


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def this_process(note: str) -> ProcessTable:
    me = os.getpid()
    entry = ProcessEntry(role="http", kind="http", name="http", index=0, pid=me, cpus=_cpus(), started_at=STARTED_AT,
                         ready=True, state="running", this_worker=True)
    return ProcessTable(source="this_process", note=note, now=time.time(), cpu_count=os.cpu_count() or 0,
                        worker=Worker(pid=me, cpus=entry.cpus), processes=[entry])


def process_table(path: str | None) -> ProcessTable:
    """The supervisor's table at `path` with this worker marked, else this process alone (with the reason)."""
    if not path:
        return this_process("no supervisor: this process was not started by `xcstack serve`")
    try:
        data = read_table(Path(path))
        me = os.getpid()
        data["processes"] = [{**p, "this_worker": p.get("pid") == me} for p in data.get("processes", [])
                             if isinstance(p, dict)]
        return ProcessTable.model_validate({**data, "source": "supervisor", "now": time.time(),
                                            "worker": {"pid": me, "cpus": _cpus()}})
    except (OSError, ValueError, ValidationError) as exc:
        return this_process(f"the supervisor's process table could not be read: {type(exc).__name__}")


def build_routes() -> list[BaseRoute]:
    @requires("system", "read")
    @api("The process tree: http workers and side processes with their cores, pids, restarts and readiness",
         response=ProcessTable, tag="system",
         description="As the supervisor of `xcstack serve` last published it (on every start, death and "
                     "readiness change), with the tuning plan's figures and this machine's CPU count; the worker "
                     "that answered is marked `this_worker`. Without a supervisor: this process alone.")
    async def processes(request: Request) -> Response:
        table = process_table(os.environ.get(STATUS_ENV))
        return JSONResponse(table.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    return [Route("/v1/system/processes", processes, methods=["GET"])]
