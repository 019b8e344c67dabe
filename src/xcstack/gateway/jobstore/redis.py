"""The Redis job store (`[gateway.jobs] store = "redis"`): jobs shared by every gateway node that
uses the same Redis (`gateway.redis_url`) and key prefix (`gateway.redis_prefix` + "jobs:").

Keys, under the prefix P:
- `P job:<id>`: a hash per job (the fields of `base.FIELDS`; an absent field is None);
- `P queued`: ZSET of queued ids scored by `created_at` (claimed oldest first);
- `P running`: ZSET of running ids scored by `lease_until` (expired leases are requeued);
- `P owner:<owner>`: ZSET of an owner's ids scored by `created_at` (listing);
- `P expiring`: ZSET of `<id>:<owner>` of finished jobs scored by `expires_at` (pruning).

Every change of more than one key is one Lua script, so it is atomic. A finished job's hash gets
PEXPIREAT at its `expires_at`; the sweep of `maintain` removes it from the indexes. Jobs survive
a gateway restart as long as Redis keeps its data (persistence, RDB/AOF, is the operator's part).
Needs standalone Redis (or one shard): the scripts touch keys they compute.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from xcstack.errors import Overloaded
from xcstack.gateway.jobstore.base import Job
from xcstack.gateway.protocol import GatewayCode

log = logging.getLogger("xcstack.gateway.jobs")

_FLOATS = ("lease_until", "created_at", "started_at", "finished_at", "expires_at")
_INTS = ("attempts", "http_status")
_BATCH = 500  # ids per maintenance script call: each call holds Redis only briefly

# KEYS: queued, job, owner index. ARGV: max_queued, id, created_at, field, value, ...
_SUBMIT = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# KEYS: queued, running. ARGV: job key prefix, worker, now, lease_until. Returns HGETALL or nil.
_CLAIM = """
for _ = 1, 100 do
  local ids = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #ids == 0 then return false end
  local id = ids[1]
  redis.call('ZREM', KEYS[1], id)
  local k = ARGV[1] .. id
  if redis.call('HGET', k, 'status') == 'queued' then
    redis.call('HSET', k, 'status', 'running', 'worker', ARGV[2], 'lease_until', ARGV[4], 'started_at', ARGV[3])
    redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('ZADD', KEYS[2], ARGV[4], id)
    return redis.call('HGETALL', k)
  end
end
return false
"""

# KEYS: running. ARGV: job key prefix, worker, lease_until, id, ... Returns the ids not renewed.
_RENEW = """
local gone = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local k = ARGV[1] .. id
  local v = redis.call('HMGET', k, 'status', 'worker')
  if v[1] == 'running' and v[2] == ARGV[2] then
    redis.call('HSET', k, 'lease_until', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[3], id)
  else
    table.insert(gone, id)
  end
end
return gone
"""

# KEYS: job, running, expiring. ARGV: id, worker, status, finished_at, expires_at, expires_at ms,
# http_status, result, error ('' = none). Public: tests check that a finish is one EVALSHA of it.
FINISH = """
local v = redis.call('HMGET', KEYS[1], 'status', 'worker', 'owner')
if v[1] ~= 'running' or v[2] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'lease_until', 'http_status', 'result', 'error')
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[4], 'expires_at', ARGV[5])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'http_status', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[9]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1] .. ':' .. v[3])
return 1
"""

# KEYS: job, queued, running, expiring. ARGV: id, owner, error, finished_at, expires_at, expires_at ms.
_CANCEL = """
local v = redis.call('HMGET', KEYS[1], 'status', 'owner')
if v[2] ~= ARGV[2] or (v[1] ~= 'queued' and v[1] ~= 'running') then return 0 end
redis.call('HDEL', KEYS[1], 'lease_until')
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'error', ARGV[3], 'finished_at', ARGV[4], 'expires_at', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1] .. ':' .. ARGV[2])
return 1
"""

# KEYS: queued, running. ARGV: job key prefix, worker, id, ...
_REQUEUE = """
for i = 3, #ARGV do
  local id = ARGV[i]
  local k = ARGV[1] .. id
  local v = redis.call('HMGET', k, 'status', 'worker', 'created_at')
  if v[1] == 'running' and v[2] == ARGV[2] then
    redis.call('HSET', k, 'status', 'queued')
    redis.call('HDEL', k, 'worker', 'lease_until')
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], v[3], id)
  end
end
return 0
"""

# KEYS: queued, running. ARGV: job key prefix, now, batch. Requeues running jobs whose lease ended
# before now; returns how many ids it looked at (batch: call again).
_EXPIRE_LEASES = """
local now = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local k = ARGV[1] .. id
  local v = redis.call('HMGET', k, 'status', 'lease_until', 'created_at')
  local lease = tonumber(v[2]) or 0
  if v[1] == 'running' and lease < now then
    redis.call('HSET', k, 'status', 'queued')
    redis.call('HDEL', k, 'worker', 'lease_until')
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], v[3], id)
  elseif v[1] == 'running' then
    redis.call('ZADD', KEYS[2], v[2], id)
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return #ids
"""

# KEYS: expiring. ARGV: job key prefix, owner index prefix, now, batch. Deletes jobs that expired
# before now and their index entries; returns how many it deleted (batch: call again).
_SWEEP = """
local ms = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, m in ipairs(ms) do
  local c = string.find(m, ':', 1, true)
  if c then
    local id = string.sub(m, 1, c - 1)
    redis.call('DEL', ARGV[1] .. id)
    redis.call('ZREM', ARGV[2] .. string.sub(m, c + 1), id)
  end
  redis.call('ZREM', KEYS[1], m)
end
return #ms
"""


@contextlib.contextmanager
def _available() -> Iterator[None]:
    """Redis down or too slow: a retriable 503 instead of a bare 500."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Overloaded(f"the job store (Redis) is unavailable: {type(exc).__name__}",
                         code=GatewayCode.JOBS_STORE_UNAVAILABLE, retry_after=1) from exc


def _num(value: float) -> str:
    return repr(float(value))


def _ms(value: float) -> int:
    return math.ceil(value * 1000)


def _decode(raw: Mapping[Any, Any] | Sequence[Any] | None) -> Job | None:
    """A job hash (HGETALL as a dict, or the flat list a script returns) as a job dict."""
    if not raw:
        return None
    pairs = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    data = {str(k): str(v) for k, v in pairs}
    job: Job = {}
    for f in ("id", "owner", "endpoint", "body", "metadata", "status", "result", "error", "worker"):
        job[f] = data.get(f)
    for f in _FLOATS:
        job[f] = float(data[f]) if data.get(f) else None
    for f in _INTS:
        job[f] = int(data[f]) if data.get(f) else None
    job["attempts"] = job["attempts"] or 0
    return job


class RedisJobStore:
    """Jobs in Redis, shared by every node with the same `url` and `prefix`."""

    def __init__(self, url: str, prefix: str, *, socket_timeout_s: float = 5.0) -> None:
        self.prefix = prefix
        self._job = prefix + "job:"
        self._owner = prefix + "owner:"
        self._queued = prefix + "queued"
        self._running = prefix + "running"
        self._expiring = prefix + "expiring"
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=socket_timeout_s, socket_connect_timeout=2.0)
        reg = self.redis.register_script
        self._submit, self._claim, self._renew = reg(_SUBMIT), reg(_CLAIM), reg(_RENEW)
        self._finish, self._cancel, self._requeue = reg(FINISH), reg(_CANCEL), reg(_REQUEUE)
        self._expire_leases, self._sweep = reg(_EXPIRE_LEASES), reg(_SWEEP)

    async def start(self) -> None:
        # Redis may come up after the gateway: jobs answer 503 until then, the dispatcher retries.
        try:
            await self.redis.ping()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("job store: Redis not reachable yet (%s); jobs answer 503 until it is", exc)

    async def close(self) -> None:
        await self.redis.aclose()

    async def submit(self, job_id: str, owner: str, endpoint: str, body: str, metadata: str | None,
                     created_at: float, max_queued: int) -> bool:
        fields: list[Any] = ["id", job_id, "owner", owner, "endpoint", endpoint, "body", body, "status", "queued",
                             "attempts", 0, "created_at", _num(created_at)]
        if metadata is not None:
            fields += ["metadata", metadata]
        with _available():
            n = await self._submit(keys=[self._queued, self._job + job_id, self._owner + owner],
                                   args=[max_queued, job_id, _num(created_at), *fields])
        if int(n) < 0:
            raise RuntimeError(f"job id {job_id!r} exists already")
        return int(n) == 1

    async def claim(self, worker: str, now: float, lease_until: float) -> Job | None:
        with _available():
            raw = await self._claim(keys=[self._queued, self._running],
                                    args=[self._job, worker, _num(now), _num(lease_until)])
        return _decode(raw)

    async def renew(self, worker: str, ids: Sequence[str], lease_until: float) -> list[str]:
        if not ids:
            return []
        with _available():
            gone = await self._renew(keys=[self._running], args=[self._job, worker, _num(lease_until), *ids])
        return [str(i) for i in gone]

    async def finish(self, worker: str, job_id: str, status: str, http_status: int | None, result: str | None,
                     error: str | None, now: float, expires_at: float) -> bool:
        with _available():
            n = await self._finish(
                keys=[self._job + job_id, self._running, self._expiring],
                args=[job_id, worker, status, _num(now), _num(expires_at), _ms(expires_at),
                      "" if http_status is None else http_status, result or "", error or ""],
            )
        return int(n) == 1

    async def cancel(self, owner: str, job_id: str, error: str, now: float, expires_at: float) -> bool:
        with _available():
            n = await self._cancel(keys=[self._job + job_id, self._queued, self._running, self._expiring],
                                   args=[job_id, owner, error, _num(now), _num(expires_at), _ms(expires_at)])
        return int(n) == 1

    async def get(self, owner: str, job_id: str, now: float) -> Job | None:
        with _available():
            job = _decode(await self.redis.hgetall(self._job + job_id))  # type: ignore[misc]  # Awaitable | dict
        if job is None or job["owner"] != owner or (job["expires_at"] is not None and job["expires_at"] < now):
            return None
        return job

    async def list_owned(self, owner: str, now: float, limit: int) -> list[Job]:
        out: list[Job] = []
        start, page = 0, max(limit, 16)
        with _available():
            while len(out) < limit:
                ids = [str(i) for i in await self.redis.zrevrange(self._owner + owner, start, start + page - 1)]
                if not ids:
                    break
                async with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hgetall(self._job + job_id)
                    rows = await pipe.execute()
                for raw in rows:
                    job = _decode(raw)
                    # gone (expired, not yet swept from the index) or expired by `now`: not listed
                    if job is not None and (job["expires_at"] is None or job["expires_at"] >= now):
                        out.append(job)
                start += page
        return out[:limit]

    async def requeue(self, worker: str, ids: Sequence[str]) -> None:
        if ids:
            with _available():
                await self._requeue(keys=[self._queued, self._running], args=[self._job, worker, *ids])

    async def maintain(self, now: float, sweep: bool) -> None:
        with _available():
            while int(await self._expire_leases(keys=[self._queued, self._running],
                                                args=[self._job, _num(now), _BATCH])) >= _BATCH:
                pass
            while sweep and int(await self._sweep(keys=[self._expiring],
                                                  args=[self._job, self._owner, _num(now), _BATCH])) >= _BATCH:
                pass
