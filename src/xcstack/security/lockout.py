"""Brute-force lockout: N consecutive failures lock an identity for a while.

Counters live in the state store (one node) or in Redis (`[security] redis_url`), so every node
and every worker sees the same count. Keys are SM3 hashes of the lower-cased user name, also for
names that do not exist (a lock reveals nothing about existence).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from xcstack.crypto.recipes import sm3
from xcstack.state.store import StateStore, Tx


def identity_key(username: str) -> str:
    return sm3(username.strip().lower().encode()).hex()[:40]


class Lockout(Protocol):
    async def locked_for(self, key: str) -> float:
        """Seconds the identity stays locked (0: not locked)."""
        ...

    async def failure(self, key: str) -> float:
        """Count one failure; returns the lock time now in force (0 when not locked)."""
        ...

    async def reset(self, key: str) -> None: ...

    async def close(self) -> None: ...


class StateLockout:
    def __init__(self, store: StateStore, threshold: int, lock_s: float, clock: Callable[[], float] = time.time):
        self.store = store
        self.threshold = threshold
        self.lock_s = lock_s
        self.clock = clock

    async def locked_for(self, key: str) -> float:
        row = await self.store.fetchone("SELECT locked_until FROM sec_lockout WHERE k = ?", (key,))
        if row is None:
            return 0.0
        return max(0.0, float(row["locked_until"]) - self.clock())

    async def failure(self, key: str) -> float:
        now = self.clock()

        def run(tx: Tx) -> float:
            row = tx.fetchone("SELECT failures, locked_until FROM sec_lockout WHERE k = ?", (key,))
            failures = 0
            if row is not None:
                failures = int(row["failures"])
                if float(row["locked_until"]) and float(row["locked_until"]) <= now:
                    failures = 0  # an expired lock starts a fresh count
            failures += 1
            until = now + self.lock_s if failures >= self.threshold else 0.0
            tx.execute("DELETE FROM sec_lockout WHERE k = ?", (key,))
            tx.execute("INSERT INTO sec_lockout (k, failures, locked_until, updated_at) VALUES (?, ?, ?, ?)",
                       (key, failures, until, now))
            return max(0.0, until - now)

        return await self.store.transaction(run)

    async def reset(self, key: str) -> None:
        await self.store.execute("DELETE FROM sec_lockout WHERE k = ?", (key,))

    async def close(self) -> None:
        return None


class RedisLockout:
    """Shared counters: `<prefix>fail:<key>` (INCR, expires after the lock time) and
    `<prefix>lock:<key>` (set with PX when the threshold is reached)."""

    _SCRIPT = """
    local n = redis.call('INCR', KEYS[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    if n >= tonumber(ARGV[1]) then
      redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
      redis.call('DEL', KEYS[1])
      return tonumber(ARGV[2])
    end
    local ttl = redis.call('PTTL', KEYS[2])
    if ttl > 0 then return ttl end
    return 0
    """

    def __init__(self, url: str, prefix: str, threshold: int, lock_s: float, client: Any = None) -> None:
        import redis.asyncio as aioredis

        self.redis = client or aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.threshold = threshold
        self.lock_ms = int(lock_s * 1000)
        self._script = self.redis.register_script(self._SCRIPT)

    async def locked_for(self, key: str) -> float:
        ttl = await self.redis.pttl(f"{self.prefix}lock:{key}")
        return max(0.0, int(ttl) / 1000.0)

    async def failure(self, key: str) -> float:
        ms = await self._script(keys=[f"{self.prefix}fail:{key}", f"{self.prefix}lock:{key}"],
                                args=[self.threshold, self.lock_ms])
        return max(0.0, int(ms) / 1000.0)

    async def reset(self, key: str) -> None:
        await self.redis.delete(f"{self.prefix}fail:{key}", f"{self.prefix}lock:{key}")

    async def close(self) -> None:
        await self.redis.aclose()
