"""The SQL job store (`[gateway.jobs] store = "state"`, the default): jobs in the `gateway_jobs` table
of the state store (SQLite by default, PostgreSQL/KingbaseES with `[state] url`)."""

from __future__ import annotations

from collections.abc import Sequence

from xcstack.gateway.jobstore.base import Job
from xcstack.state.store import StateStore, Tx

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


class SQLJobStore:
    """Jobs in the `gateway_jobs` table of the state store. A job is claimed with
    `UPDATE ... WHERE status='queued'` (one winner across workers and nodes)."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    async def start(self) -> None:
        await self.state.migrate(NAMESPACE, MIGRATIONS)

    async def close(self) -> None:
        """The state store is the app's; nothing to release."""

    async def submit(self, job_id: str, owner: str, endpoint: str, body: str, metadata: str | None,
                     created_at: float, max_queued: int) -> bool:
        def tx(t: Tx) -> bool:
            row = t.fetchone("SELECT COUNT(*) AS n FROM gateway_jobs WHERE status='queued'")
            if row is not None and int(row["n"]) >= max_queued:
                return False
            t.execute(
                "INSERT INTO gateway_jobs (id, owner, endpoint, body, metadata, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, owner, endpoint, body, metadata, created_at),
            )
            return True

        return await self.state.transaction(tx)

    async def claim(self, worker: str, now: float, lease_until: float) -> Job | None:
        def tx(t: Tx) -> Job | None:
            for _ in range(5):
                row = t.fetchone("SELECT id FROM gateway_jobs WHERE status='queued' ORDER BY created_at LIMIT 1")
                if row is None:
                    return None
                n = t.execute(
                    "UPDATE gateway_jobs SET status='running', worker=?, lease_until=?, started_at=?, "
                    "attempts=attempts+1 WHERE id=? AND status='queued'",
                    (worker, lease_until, now, row["id"]),
                )
                if n == 1:
                    return t.fetchone("SELECT * FROM gateway_jobs WHERE id=?", (row["id"],))
            return None

        return await self.state.transaction(tx)

    async def renew(self, worker: str, ids: Sequence[str], lease_until: float) -> list[str]:
        def tx(t: Tx) -> list[str]:
            gone = []
            for job_id in ids:
                if t.execute("UPDATE gateway_jobs SET lease_until=? WHERE id=? AND status='running' AND worker=?",
                             (lease_until, job_id, worker)) == 0:
                    gone.append(job_id)
            return gone

        return await self.state.transaction(tx)

    async def finish(self, worker: str, job_id: str, status: str, http_status: int | None, result: str | None,
                     error: str | None, now: float, expires_at: float) -> bool:
        n = await self.state.execute(
            "UPDATE gateway_jobs SET status=?, http_status=?, result=?, error=?, finished_at=?, expires_at=?, "
            "lease_until=NULL WHERE id=? AND status='running' AND worker=?",
            (status, http_status, result, error, now, expires_at, job_id, worker),
        )
        return n > 0

    async def cancel(self, owner: str, job_id: str, error: str, now: float, expires_at: float) -> bool:
        n = await self.state.execute(
            "UPDATE gateway_jobs SET status='cancelled', error=?, finished_at=?, expires_at=?, lease_until=NULL "
            "WHERE id=? AND owner=? AND status IN ('queued', 'running')",
            (error, now, expires_at, job_id, owner),
        )
        return n > 0

    async def get(self, owner: str, job_id: str, now: float) -> Job | None:
        row = await self.state.fetchone("SELECT * FROM gateway_jobs WHERE id=? AND owner=?", (job_id, owner))
        if row is None or (row["expires_at"] is not None and row["expires_at"] < now):
            return None
        return row

    async def list_owned(self, owner: str, now: float, limit: int) -> list[Job]:
        return await self.state.fetchall(
            "SELECT * FROM gateway_jobs WHERE owner=? AND (expires_at IS NULL OR expires_at >= ?) "
            "ORDER BY created_at DESC LIMIT ?", (owner, now, limit))

    async def requeue(self, worker: str, ids: Sequence[str]) -> None:
        def tx(t: Tx) -> None:
            for job_id in ids:
                t.execute("UPDATE gateway_jobs SET status='queued', worker=NULL, lease_until=NULL "
                          "WHERE id=? AND status='running' AND worker=?", (job_id, worker))

        await self.state.transaction(tx)

    async def maintain(self, now: float, sweep: bool) -> None:
        def tx(t: Tx) -> None:
            t.execute("UPDATE gateway_jobs SET status='queued', worker=NULL, lease_until=NULL "
                      "WHERE status='running' AND lease_until < ?", (now,))
            if sweep:
                t.execute("DELETE FROM gateway_jobs WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))

        await self.state.transaction(tx)
