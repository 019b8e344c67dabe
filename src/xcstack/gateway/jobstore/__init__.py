"""Where async jobs live: the `JobStore` protocol that `JobManager` talks to (`base.py`), the SQL
store (`sql.py`: the state store) and the Redis store (`redis.py`, imported only when configured),
and `open_job_store`, which picks one from `[gateway.jobs] store` ("state" or "redis")."""

from __future__ import annotations

from xcstack.gateway.jobstore.base import FIELDS, Job, JobStore
from xcstack.gateway.jobstore.sql import SQLJobStore
from xcstack.gateway.settings import GatewaySettings
from xcstack.state.store import StateStore

__all__ = ["FIELDS", "Job", "JobStore", "SQLJobStore", "open_job_store"]


def open_job_store(settings: GatewaySettings, state: StateStore) -> JobStore:
    """The job store `[gateway.jobs] store` names."""
    if settings.jobs.store == "redis":
        from xcstack.gateway.jobstore.redis import RedisJobStore

        if settings.redis_url is None:  # the settings validator rejects this already
            raise ValueError("gateway.jobs.store = 'redis' needs gateway.redis_url")
        return RedisJobStore(settings.redis_url.get_secret_value(), settings.redis_prefix + "jobs:")
    return SQLJobStore(state)
