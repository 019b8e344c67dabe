"""Rate limits per API key: requests/min and tokens/min, token buckets.

`check(key, estimate)` takes one request and checks the prompt-token estimate before the call
(the estimate is taken from the token bucket); `charge(key, delta)` books the difference between
actual usage and the estimate afterwards (it may put the bucket in debt, which delays the key's
next requests). Local buckets by default; with `[gateway] redis_url`, one Lua script does the same
atomically in Redis, so every gateway instance shares the limit. If Redis fails, the local buckets
take over (fail open to the per-instance limit, logged and counted) rather than failing requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from xcstack.errors import RateLimited
from xcstack.gateway import metrics
from xcstack.gateway.protocol import RATE_LIMITED_REQUESTS, RATE_LIMITED_TOKENS
from xcstack.gateway.settings import RateLimitSettings

log = logging.getLogger("xcstack.gateway.ratelimit")


@dataclass(frozen=True)
class Limits:
    rpm: int
    tpm: int
    burst_s: float

    @property
    def req_cap(self) -> float:
        return self.rpm / 60.0 * self.burst_s

    @property
    def tok_cap(self) -> float:
        return self.tpm / 60.0 * self.burst_s


class _Bucket:
    __slots__ = ("level", "t")

    def __init__(self, level: float, t: float) -> None:
        self.level = level
        self.t = t

    def refill(self, cap: float, rate: float, now: float) -> float:
        self.level = min(cap, self.level + (now - self.t) * rate)
        self.t = now
        return self.level


class LocalLimiter:
    """In-process token buckets (per key). Bounded: idle full buckets are dropped on sweep."""

    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._req: dict[str, _Bucket] = {}
        self._tok: dict[str, _Bucket] = {}

    def _bucket(self, table: dict[str, _Bucket], key: str, cap: float, now: float) -> _Bucket:
        b = table.get(key)
        if b is None:
            if len(table) >= self.MAX_KEYS:
                self._sweep(table, now)
            b = table[key] = _Bucket(cap, now)
        return b

    def _sweep(self, table: dict[str, _Bucket], now: float) -> None:
        for k in [k for k, b in table.items() if now - b.t > 3600]:
            del table[k]
        if len(table) >= self.MAX_KEYS:  # still full: drop the oldest half
            for k, _ in sorted(table.items(), key=lambda kv: kv[1].t)[: len(table) // 2]:
                del table[k]

    def check(self, key: str, lim: Limits, tokens: int) -> tuple[int, float]:
        """(0, 0) when admitted; (1|2, retry_after_s) when over requests (1) or tokens (2)."""
        now = time.monotonic()
        rb = tb = None
        if lim.rpm:
            rb = self._bucket(self._req, key, lim.req_cap, now)
            if rb.refill(lim.req_cap, lim.rpm / 60.0, now) < 1.0:
                return 1, (1.0 - rb.level) / (lim.rpm / 60.0)
        if lim.tpm:
            tb = self._bucket(self._tok, key, lim.tok_cap, now)
            need = min(float(tokens), lim.tok_cap)
            if tb.refill(lim.tok_cap, lim.tpm / 60.0, now) < need:
                return 2, (need - tb.level) / (lim.tpm / 60.0)
        if rb is not None:
            rb.level -= 1.0
        if tb is not None:
            tb.level -= tokens
        return 0, 0.0

    def charge(self, key: str, lim: Limits, tokens: int, requests: int = 0) -> None:
        """Take `tokens` (and `requests`) without checking; negative values give back."""
        now = time.monotonic()
        if lim.tpm and tokens:
            tb = self._bucket(self._tok, key, lim.tok_cap, now)
            tb.refill(lim.tok_cap, lim.tpm / 60.0, now)
            tb.level = min(lim.tok_cap, tb.level - tokens)
        if lim.rpm and requests:
            rb = self._bucket(self._req, key, lim.req_cap, now)
            rb.refill(lim.req_cap, lim.rpm / 60.0, now)
            rb.level = min(lim.req_cap, rb.level - requests)


# KEYS: request bucket, token bucket. ARGV: req_cap, req_rate, tok_cap, tok_rate, req_cost, tok_cost,
# mode (0: check and take, 1: charge without check), ttl seconds. Returns {code, retry_after}.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rcap, rrate = tonumber(ARGV[1]), tonumber(ARGV[2])
local tcap, trate = tonumber(ARGV[3]), tonumber(ARGV[4])
local rcost, tcost = tonumber(ARGV[5]), tonumber(ARGV[6])
local mode, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local function level(key, cap, rate)
  local v = redis.call('HMGET', key, 'v', 't')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or ts == nil then return cap end
  lvl = lvl + math.max(0, now - ts) * rate
  if lvl > cap then lvl = cap end
  return lvl
end
local r, k = 0, 0
if rcap > 0 then r = level(KEYS[1], rcap, rrate) end
if tcap > 0 then k = level(KEYS[2], tcap, trate) end
if mode == 0 then
  if rcap > 0 and r < rcost then return {1, tostring((rcost - r) / rrate)} end
  local need = math.min(tcost, tcap)
  if tcap > 0 and k < need then return {2, tostring((need - k) / trate)} end
end
if rcap > 0 and rcost ~= 0 then
  redis.call('HSET', KEYS[1], 'v', tostring(math.min(rcap, r - rcost)), 't', tostring(now))
  redis.call('EXPIRE', KEYS[1], ttl)
end
if tcap > 0 and tcost ~= 0 then
  redis.call('HSET', KEYS[2], 'v', tostring(math.min(tcap, k - tcost)), 't', tostring(now))
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {0, '0'}
"""


class RateLimiter:
    """The limiter the gateway uses: per-key limits from settings, local or Redis buckets."""

    def __init__(self, settings: RateLimitSettings, redis_url: str | None = None, prefix: str = "xc:gw:") -> None:
        self.settings = settings
        self.local = LocalLimiter()
        self.prefix = prefix + "rl:"
        self._default = Limits(settings.requests_per_minute, settings.tokens_per_minute, settings.burst_s)
        self._per_key = {k: Limits(r, t, settings.burst_s) for k, (r, t) in settings.per_key.items()}
        self.enabled = bool(self._default.rpm or self._default.tpm or any(
            lim.rpm or lim.tpm for lim in self._per_key.values()))
        self._redis: Any = None
        self._script: Any = None
        if redis_url and self.enabled:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._script = self._redis.register_script(_LUA)

    def limits(self, key: str) -> Limits:
        return self._per_key.get(key, self._default)

    async def check(self, key: str, est_tokens: int) -> None:
        if not self.enabled:
            return
        lim = self.limits(key)
        if not (lim.rpm or lim.tpm):
            return
        code, retry = await self._run(key, lim, 1, est_tokens, 0)
        if code:
            what = "requests" if code == 1 else "tokens"
            metrics.RATE_LIMITED.labels(what).inc()
            per = lim.rpm if code == 1 else lim.tpm
            raise RateLimited(
                f"rate limit exceeded: {per} {what} per minute for this API key; retry in {retry:.1f}s",
                retry_after=retry,
                code=RATE_LIMITED_REQUESTS if code == 1 else RATE_LIMITED_TOKENS,
            )

    async def charge(self, key: str, delta_tokens: int) -> None:
        if not self.enabled or not delta_tokens:
            return
        lim = self.limits(key)
        if not lim.tpm:
            return
        await self._run(key, lim, 0, delta_tokens, 1)

    async def refund(self, key: str, est_tokens: int) -> None:
        """Give back what `check` took for a request that was then not served (e.g. 503)."""
        if not self.enabled:
            return
        lim = self.limits(key)
        if lim.rpm or lim.tpm:
            await self._run(key, lim, -1, -est_tokens, 1)

    async def _run(self, key: str, lim: Limits, req: int, tokens: int, mode: int) -> tuple[int, float]:
        if self._script is not None:
            try:
                res = await self._script(
                    keys=[f"{self.prefix}{key}:r", f"{self.prefix}{key}:t"],
                    args=[lim.req_cap, lim.rpm / 60.0, lim.tok_cap, lim.tpm / 60.0, req, tokens, mode,
                          int(lim.burst_s * 2 + 60)],
                )
                return int(res[0]), float(res[1])
            except Exception as exc:  # Redis down or slow: fall back to this instance's buckets
                metrics.RATE_LIMIT_BACKEND_ERRORS.inc()
                log.warning("redis rate limiter failed (%s); using local buckets", exc)
        if mode == 1:
            self.local.charge(key, lim, tokens, req)
            return 0, 0.0
        return self.local.check(key, lim, tokens)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
