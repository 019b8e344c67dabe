"""Rate limits per API key: requests/min and tokens/min, token buckets.

`check(key, estimate)` takes one request and checks the prompt-token estimate before the call
(the estimate is taken from the token bucket); `charge(key, delta)` books the difference between
actual usage and the estimate afterwards (it may put the bucket in debt, which delays the key's
next requests). Local buckets by default; with `[gateway] redis_url`, one Lua script does the same
atomically in Redis, so every gateway instance shares the limit. If Redis fails, the local buckets
take over (fail open to the per-instance limit, counted) rather than failing requests.

The shared limiter runs before admission, so it must never hold requests up: each Redis call has a
short timeout (`redis_timeout_s`, no retry), at most `redis_max_pending` calls are in flight (beyond
that the local buckets decide at once), and a breaker skips Redis after `redis_breaker.failure_threshold`
consecutive failures for `open_s`, then lets one probe through. A state change of that breaker logs
one WARNING (opened / closed again); it is exported as `xc_gateway_rate_limit_breaker_state` and
`/readyz` says "shared rate limiter degraded" while it is not closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from xcstack.errors import RateLimited
from xcstack.gateway import metrics
from xcstack.gateway.admission import Breaker
from xcstack.gateway.protocol import GatewayCode
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
        self.timeout_s = settings.redis_timeout_s
        self.max_pending = settings.redis_max_pending
        self.pending = 0
        self.breaker = Breaker(settings.redis_breaker.failure_threshold, settings.redis_breaker.open_s)
        self._state = Breaker.CLOSED  # last state logged and exported
        if redis_url and self.enabled:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # no retry inside redis-py (its default retries 10 times): the breaker decides what a failure means
            self._redis = aioredis.Redis.from_url(
                redis_url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )  # connections in use are bounded by `max_pending` (see `_shared`)
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
                code=GatewayCode.RATE_LIMITED_REQUESTS if code == 1 else GatewayCode.RATE_LIMITED_TOKENS,
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
            ok, res = await self._shared(lambda: self._script(
                keys=[f"{self.prefix}{key}:r", f"{self.prefix}{key}:t"],
                args=[lim.req_cap, lim.rpm / 60.0, lim.tok_cap, lim.tpm / 60.0, req, tokens, mode,
                      int(lim.burst_s * 2 + 60)],
            ))
            if ok:
                return int(res[0]), float(res[1])
        if mode == 1:
            self.local.charge(key, lim, tokens, req)
            return 0, 0.0
        return self.local.check(key, lim, tokens)

    async def _shared(self, call: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """One bounded Redis call through the breaker: (True, result), or (False, None) when the local
        buckets must decide (breaker open, too many calls in flight, Redis failed or timed out)."""
        if self.pending >= self.max_pending:
            metrics.RATE_LIMIT_LOCAL.labels("busy").inc()
            return False, None
        if not self.breaker.begin():  # open (or half-open with its probe out): do not wait at all
            metrics.RATE_LIMIT_LOCAL.labels("breaker_open").inc()
            return False, None
        self._sync_state(None)  # open -> half-open
        self.pending += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                res = await call()
        except Exception as exc:  # Redis down, silent (timeout) or erroring: the local buckets decide
            self.breaker.failure()
            metrics.RATE_LIMIT_BACKEND_ERRORS.inc()
            metrics.RATE_LIMIT_LOCAL.labels("error").inc()
            self._sync_state(exc)
            return False, None
        except BaseException:  # cancelled (shutdown): says nothing about Redis; free the probe
            self.breaker.neutral()
            raise
        finally:
            self.pending -= 1
        self.breaker.success()
        self._sync_state(None)
        return True, res

    def _sync_state(self, exc: BaseException | None) -> None:
        """Export a breaker state change and log it: one WARNING when the shared limiter degrades and one
        when it recovers (a failed half-open probe, once per `open_s`, logs at INFO; single failures below
        the threshold at DEBUG: they are counted in xc_gateway_rate_limit_backend_errors_total)."""
        state = self.breaker.state
        if state == self._state:
            if exc is not None:
                log.debug("redis rate limiter call failed (%r); local buckets used for it", exc)
            return
        before, self._state = self._state, state
        metrics.RATE_LIMIT_BREAKER.set(state)
        if state == Breaker.OPEN and before == Breaker.CLOSED:
            log.warning("shared rate limiter degraded: Redis failed %d times in a row (last: %r); using per-node "
                        "local limits, next try in %.1fs", self.breaker.failures, exc, self.breaker.open_s)
        elif state == Breaker.OPEN:
            log.info("shared rate limiter: Redis probe failed (%r); local limits for another %.1fs", exc,
                     self.breaker.open_s)
        elif state == Breaker.CLOSED:
            log.warning("shared rate limiter recovered: Redis answers again; shared limits in use")

    def degraded(self) -> str | None:
        """For /readyz: why the shared limiter is not in use, or None (healthy, or no Redis configured)."""
        if self._script is None or self.breaker.state == Breaker.CLOSED:
            return None
        return (f"shared rate limiter degraded (Redis not answering; per-node local limits; breaker "
                f"{self.breaker.state_name})")

    async def probe(self) -> None:
        """Let a due half-open probe (a PING) through, so that /readyz sees Redis come back without traffic."""
        if self._redis is not None and self.breaker.state == Breaker.OPEN and self.breaker.available():
            await self._shared(self._redis.ping)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
