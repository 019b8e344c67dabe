"""What `JobManager` needs from a job store (`JobStore`), and what a job is.

A job is a dict with the keys of `FIELDS`: `id`, `owner`, `endpoint`, `body` (JSON text),
`metadata` (JSON text or None), `status` (queued, running, succeeded, failed, cancelled),
`http_status`, `result` and `error` (JSON text or None), `attempts`, `worker` and `lease_until`
(while running), and the times `created_at`, `started_at`, `finished_at`, `expires_at` (Unix
seconds). Every state change is atomic in the store; times are the caller's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Job = dict[str, Any]
FIELDS = ("id", "owner", "endpoint", "body", "metadata", "status", "http_status", "result", "error", "attempts",
          "worker", "lease_until", "created_at", "started_at", "finished_at", "expires_at")


class JobStore(Protocol):
    """The operations `JobManager` needs; each one is atomic."""

    async def start(self) -> None:
        """Prepare the store (tables, connections)."""

    async def close(self) -> None:
        """Release what `start` opened."""

    async def submit(self, job_id: str, owner: str, endpoint: str, body: str, metadata: str | None,
                     created_at: float, max_queued: int) -> bool:
        """Queue a new job; False (and nothing stored) when `max_queued` jobs are queued already."""

    async def claim(self, worker: str, now: float, lease_until: float) -> Job | None:
        """Take the oldest queued job for `worker`: running, leased until `lease_until`, one more attempt."""

    async def renew(self, worker: str, ids: Sequence[str], lease_until: float) -> list[str]:
        """Extend the leases of `worker`'s running jobs; returns the ids that are no longer its own
        running jobs (cancelled, or requeued and taken over elsewhere)."""

    async def finish(self, worker: str, job_id: str, status: str, http_status: int | None, result: str | None,
                     error: str | None, now: float, expires_at: float) -> bool:
        """Record the outcome of a job `worker` runs; False when it is no longer its running job."""

    async def cancel(self, owner: str, job_id: str, error: str, now: float, expires_at: float) -> bool:
        """Cancel `owner`'s queued or running job; False when there is none such."""

    async def get(self, owner: str, job_id: str, now: float) -> Job | None:
        """`owner`'s job, or None (missing, someone else's, or expired by `now`)."""

    async def list_owned(self, owner: str, now: float, limit: int) -> list[Job]:
        """`owner`'s unexpired jobs, newest first, at most `limit`."""

    async def requeue(self, worker: str, ids: Sequence[str]) -> None:
        """Put `worker`'s running jobs among `ids` back in the queue at once (no lease wait)."""

    async def maintain(self, now: float, sweep: bool) -> None:
        """Requeue running jobs whose lease ended before `now` (their worker died); with `sweep`,
        delete the jobs that expired before `now`."""
