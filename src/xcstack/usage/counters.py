"""Quota counters: integers per (quota, subject, period), reserved and settled atomically.

`reserve` adds every amount only if each checked counter stays within its limit (all or nothing), so
concurrent requests can overshoot a hard quota only by what each one uses beyond its reservation.
`LocalCounters` serve one node; `RedisCounters` (one Lua script per call) are shared by every node.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

Item = tuple[str, int, int]  # counter key, amount, limit (-1: counted, not checked)


class Counters(Protocol):
    async def reserve(self, items: Sequence[Item], ttl: int) -> tuple[int, list[int]]:
        """(-1, values after) when every checked counter fits; else (index of the first that does not,
        values before) and nothing is added."""
        ...

    async def add(self, items: Sequence[tuple[str, int]], ttl: int) -> list[int]:
        """Add (possibly negative) amounts unchecked; the values after."""
        ...

    async def get(self, keys: Sequence[str]) -> list[int]: ...

    async def first(self, key: str, ttl: int) -> bool:
        """True for the one caller that marks `key` first (an alert sent once per period)."""
        ...

    async def close(self) -> None: ...


class LocalCounters:
    """In-process counters; a key expires with its period (swept when the table grows)."""

    SWEEP_AT = 200_000

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.expires: dict[str, float] = {}

    def _sweep(self) -> None:
        now = time.time()
        for k in [k for k, t in self.expires.items() if t < now]:
            self.values.pop(k, None)
            self.expires.pop(k, None)

    def _touch(self, key: str, ttl: int) -> None:
        if key not in self.expires:
            if len(self.expires) >= self.SWEEP_AT:
                self._sweep()
            self.expires[key] = time.time() + ttl

    async def reserve(self, items: Sequence[Item], ttl: int) -> tuple[int, list[int]]:
        vals = self.values
        before = [vals.get(k, 0) for k, _, _ in items]
        for i, (_, amount, limit) in enumerate(items):
            if limit >= 0 and before[i] + amount > limit:
                return i, before
        after = []
        for (k, amount, _), v in zip(items, before, strict=True):
            vals[k] = v + amount
            self._touch(k, ttl)
            after.append(v + amount)
        return -1, after

    async def add(self, items: Sequence[tuple[str, int]], ttl: int) -> list[int]:
        out = []
        for k, amount in items:
            v = self.values[k] = self.values.get(k, 0) + amount
            self._touch(k, ttl)
            out.append(v)
        return out

    async def get(self, keys: Sequence[str]) -> list[int]:
        return [self.values.get(k, 0) for k in keys]

    async def first(self, key: str, ttl: int) -> bool:
        if key in self.values:
            return False
        self.values[key] = 1
        self._touch(key, ttl)
        return True

    async def close(self) -> None:
        return None


# KEYS: the counters. ARGV: ttl, then amount and limit per key. All or nothing.
_RESERVE = """
local n = #KEYS
local ttl = tonumber(ARGV[1])
local cur = {}
for i = 1, n do cur[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
for i = 1, n do
  local lim = tonumber(ARGV[2 * i + 1])
  if lim >= 0 and cur[i] + tonumber(ARGV[2 * i]) > lim then
    cur[n + 1] = i - 1
    return cur
  end
end
for i = 1, n do
  cur[i] = redis.call('INCRBY', KEYS[i], ARGV[2 * i])
  redis.call('EXPIRE', KEYS[i], ttl)
end
cur[n + 1] = -1
return cur
"""

_ADD = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('INCRBY', KEYS[i], ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return out
"""


class RedisCounters:
    """Counters in Redis, shared by every node: each call one script, bounded by `timeout_s` (no retry)."""

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.prefix = prefix
        self.redis: Any = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                  retry=Retry(NoBackoff(), 0))
        self._reserve = self.redis.register_script(_RESERVE)
        self._add = self.redis.register_script(_ADD)

    async def reserve(self, items: Sequence[Item], ttl: int) -> tuple[int, list[int]]:
        args: list[int] = [ttl]
        for _, amount, limit in items:
            args += [amount, limit]
        res = await self._reserve(keys=[self.prefix + k for k, _, _ in items], args=args)
        return int(res[-1]), [int(v) for v in res[:-1]]

    async def add(self, items: Sequence[tuple[str, int]], ttl: int) -> list[int]:
        res = await self._add(keys=[self.prefix + k for k, _ in items], args=[ttl, *(a for _, a in items)])
        return [int(v) for v in res]

    async def get(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        res = await self.redis.mget([self.prefix + k for k in keys])
        return [int(v) if v is not None else 0 for v in res]

    async def first(self, key: str, ttl: int) -> bool:
        return bool(await self.redis.set(self.prefix + key, 1, nx=True, ex=ttl))

    async def close(self) -> None:
        await self.redis.aclose()
