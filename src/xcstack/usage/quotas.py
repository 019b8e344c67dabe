"""Quotas: which apply to a caller, the reservation before a call, the settlement after it, soft alerts.

A call reserves what it may use (1 request, its prompt estimate, its `max_tokens` or
`[usage] output_reserve_tokens`, the cost of those) in every counter of every quota that applies to its
key, user and group, all or nothing (`counters.py`): a hard quota that would go over refuses the call
(429 `quota_exceeded`, naming the quota and when it resets, `Retry-After`). After the call the counters
are corrected to what was really used; a call that never reached an upstream gives everything back. So
concurrent calls overshoot a hard quota by at most what each uses beyond its reservation.

Soft quotas are counted, never refuse, and alert once per period when they pass 80% and 100% (a
WARNING, `xc_usage_quota_alerts_total`, and an audit record when the security capability is on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from xcstack.errors import Overloaded, RateLimited
from xcstack.usage.counters import Counters, Item, LocalCounters
from xcstack.usage.periods import Calendar
from xcstack.usage.prices import MICRO, PriceTable
from xcstack.usage.protocol import UsageCode
from xcstack.usage.settings import QuotaRule, UsageSettings

log = logging.getLogger("xcstack.usage")

REFUSED = Counter("xc_usage_quota_refused", "Calls refused by a hard quota", ["scope", "metric", "period"])
ALERTS = Counter("xc_usage_quota_alerts", "Soft quota alerts (once per period and threshold)", ["scope", "level"])
COUNTER_ERRORS = Counter("xc_usage_counter_errors", "Shared quota counter (Redis) calls that failed")
LOCAL_FALLBACK = Counter("xc_usage_counter_local", "Quota decisions taken by per-node counters (Redis down)")

METRICS = ("requests", "input_tokens", "output_tokens", "total_tokens", "cost")
THRESHOLDS = (0.8, 1.0)


@dataclass(frozen=True)
class Rule:
    id: str
    rule: QuotaRule
    source: str  # config | api
    subject_id: str  # the subject as counted: user names resolved to user ids

    def limit_units(self) -> int:
        """The limit in counter units (cost: micro-units of the currency)."""
        return round(self.rule.limit * MICRO) if self.rule.metric == "cost" else int(self.rule.limit)


@dataclass(frozen=True)
class Caller:
    key: str  # API key id ('' for a session)
    user: str  # user id ('' when unknown)
    group: str  # group name ('' for none)

    def subject(self, scope: str) -> str:
        return self.key if scope == "key" else self.user if scope == "user" else self.group


def caller_of(scope: Mapping[str, Any]) -> Caller:
    """Key, user and group of the request's principal (the security middleware's); without security
    every call is the anonymous user's."""
    p = scope.get("xc.principal")
    if p is None:
        return Caller("", "", "")
    kind = getattr(p, "kind", "user")
    pid = str(getattr(p, "id", ""))
    group = getattr(p, "group", None) or ""
    if kind == "api_key":
        return Caller(pid.removeprefix("apikey:"), str(getattr(p, "owner_id", "") or ""), group)
    return Caller("", pid, group)


@dataclass(slots=True)
class Ticket:
    """One call's reservation, filled in as it goes (tokens, upstream) and settled once."""

    caller: Caller
    model: str
    endpoint: str
    est_in: int
    est_out: int
    t0: float
    scope: Any  # the ASGI scope (its audit sink, for soft-quota alerts)
    items: list[tuple[Rule, str, int]] = field(default_factory=list)  # rule, counter key, amount reserved
    local: bool = False  # reserved in the per-node counters (Redis was down)
    upstream: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimated: bool = False
    request_id: str | None = None
    done: bool = False

    def record_usage(self, prompt_tokens: int, completion_tokens: int, estimated: bool = False) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.estimated = self.estimated or estimated


def amounts(prices: PriceTable, model: str, tin: int, tout: int) -> dict[str, int]:
    return {"requests": 1, "input_tokens": tin, "output_tokens": tout, "total_tokens": tin + tout,
            "cost": prices.micro(model, tin, tout)}


class Quotas:
    """The rules in force and the counters (Redis when configured, else in process)."""

    def __init__(self, settings: UsageSettings, calendar: Calendar, prices: PriceTable,
                 shared: Counters | None = None) -> None:
        self.settings = settings
        self.calendar = calendar
        self.prices = prices
        self.local: Counters = LocalCounters()
        self.shared = shared
        self._down_until = 0.0
        self._by_scope: dict[str, dict[str, list[Rule]]] = {}
        self._cache: dict[Caller, list[Rule]] = {}
        self.rules: list[Rule] = []

    # -- rules ----------------------------------------------------------------------------------------
    def set_rules(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        by: dict[str, dict[str, list[Rule]]] = {"key": {}, "user": {}, "group": {}}
        for r in self.rules:
            by[r.rule.scope].setdefault(r.subject_id, []).append(r)
        self._by_scope = by
        self._cache = {}

    def applicable(self, caller: Caller) -> list[Rule]:
        hit = self._cache.get(caller)
        if hit is not None:
            return hit
        out: list[Rule] = []
        for scope, table in self._by_scope.items():
            subject = caller.subject(scope)
            if not subject or not table:
                continue
            out += table.get(subject, ())
            out += table.get("*", ())
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[caller] = out
        return out

    def counter_key(self, r: Rule, caller: Caller, now: float | None = None) -> tuple[str, float]:
        tag, reset = self.calendar.current(r.rule.period, now)
        return f"q:{r.id}:{caller.subject(r.rule.scope)}:{tag}", reset

    # -- counters through the failure policy --------------------------------------------------------
    def _use_shared(self) -> bool:
        return self.shared is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        COUNTER_ERRORS.inc()
        if time.monotonic() >= self._down_until:
            log.warning("usage: shared quota counters (Redis) failed (%r); on_counter_failure=%s for %.1fs", exc,
                        self.settings.on_counter_failure, self.settings.redis_retry_s)
        self._down_until = time.monotonic() + self.settings.redis_retry_s

    async def _reserve(self, items: Sequence[Item], ttl: int) -> tuple[int, list[int], bool]:
        if self._use_shared():
            assert self.shared is not None
            try:
                idx, vals = await self.shared.reserve(items, ttl)
                return idx, vals, False
            except Exception as exc:
                self._failed(exc)
        if self.shared is not None:
            if self.settings.on_counter_failure == "closed":
                raise Overloaded("quota counters are unavailable (Redis); retry later", retry_after=1.0,
                                 code=UsageCode.QUOTA_COUNTERS_UNAVAILABLE)
            LOCAL_FALLBACK.inc()
        idx, vals = await self.local.reserve(items, ttl)
        return idx, vals, True

    async def _add(self, items: Sequence[tuple[str, int]], ttl: int, local: bool) -> list[int] | None:
        if not local:
            if not self._use_shared():
                return None  # Redis still down: the shared counters cannot be corrected (counted below)
            assert self.shared is not None
            try:
                return await self.shared.add(items, ttl)
            except Exception as exc:
                self._failed(exc)
                return None
        return await self.local.add(items, ttl)

    async def _first(self, key: str, ttl: int, local: bool) -> bool:
        if not local and self._use_shared():
            assert self.shared is not None
            try:
                return await self.shared.first(key, ttl)
            except Exception as exc:
                self._failed(exc)
        return await self.local.first(key, ttl)

    # -- a call ---------------------------------------------------------------------------------------
    async def reserve(self, t: Ticket) -> None:
        """Reserve the call's estimate under every applicable quota; raises 429 `quota_exceeded` (hard)."""
        rules = self.applicable(t.caller)
        if not rules:
            return
        want = amounts(self.prices, t.model, t.est_in, t.est_out)
        now = time.time()
        items: list[Item] = []
        resets: list[float] = []
        for r in rules:
            key, reset = self.counter_key(r, t.caller)
            amount = want[r.rule.metric]
            items.append((key, amount, r.limit_units() if r.rule.hard else -1))
            t.items.append((r, key, amount))
            resets.append(reset)
        ttl = int(max(resets) - now) + 3600
        idx, values, t.local = await self._reserve(items, ttl)
        if idx >= 0:
            t.items = []
            r = rules[idx]
            REFUSED.labels(r.rule.scope, r.rule.metric, r.rule.period).inc()
            reset = resets[idx]
            q = r.rule
            raise RateLimited(
                f"quota exceeded: {q.scope} {q.subject!r} may use {q.limit:g} {q.metric} per {q.period} "
                f"(quota {r.id}); it resets at {self.calendar.iso(reset)}", retry_after=max(1.0, reset - now),
                code=UsageCode.QUOTA_EXCEEDED)
        await self._alerts(t, [(r, v - a, v) for (r, _, a), v in zip(t.items, values, strict=True)])

    async def settle(self, t: Ticket, tin: int, tout: int, counted: bool) -> None:
        """Correct the reservation to what was used (`counted` False: the call is given back whole)."""
        if not t.items:
            return
        used = amounts(self.prices, t.model, tin, tout) if counted else dict.fromkeys(METRICS, 0)
        deltas = [(key, used[r.rule.metric] - amount) for r, key, amount in t.items]
        changed = [(i, d) for i, d in enumerate(deltas) if d[1]]
        if not changed:
            return
        ttl = 40 * 86400
        values = await self._add([d for _, d in changed], ttl, t.local)
        if values is not None and counted:
            await self._alerts(t, [(t.items[i][0], v - d[1], v) for (i, d), v in zip(changed, values, strict=True)])

    async def _alerts(self, t: Ticket, moves: list[tuple[Rule, int, int]]) -> None:
        for r, before, after in moves:
            if r.rule.hard:
                continue
            limit = r.limit_units()
            for thr in THRESHOLDS:
                mark = limit * thr
                if before < mark <= after or (limit == 0 and before <= 0 < after and thr == 1.0):
                    key, reset = self.counter_key(r, t.caller)
                    if await self._first(f"alert:{key}:{int(thr * 100)}", int(reset - time.time()) + 3600, t.local):
                        await self._alert(t, r, thr, after)

    async def _alert(self, t: Ticket, r: Rule, thr: float, value: int) -> None:
        q = r.rule
        level = f"{int(thr * 100)}%"
        shown = value / MICRO if q.metric == "cost" else value
        ALERTS.labels(q.scope, level).inc()
        log.warning("usage: soft quota %s reached %s: %s %r used %g of %g %s this %s", r.id, level, q.scope,
                    t.caller.subject(q.scope), shown, q.limit, q.metric, q.period)
        sink = t.scope.get("xc.audit")
        if sink is not None:
            from starlette.requests import Request

            try:
                await sink(Request(t.scope), "usage.quota_alert", f"quota:{r.id}", "success",
                           {"level": level, "scope": q.scope, "subject": t.caller.subject(q.scope),
                            "metric": q.metric, "period": q.period, "limit": q.limit, "used": shown})
            except Exception as exc:  # an alert must never fail the call it rides on
                log.error("usage: could not audit a quota alert: %r", exc)

    async def used(self, r: Rule, caller: Caller) -> tuple[float, float]:
        """(used, reset epoch) of one quota for one caller."""
        key, reset = self.counter_key(r, caller)
        try:
            vals = await (self.shared.get([key]) if self._use_shared() and self.shared else self.local.get([key]))
        except Exception as exc:
            self._failed(exc)
            vals = await self.local.get([key])
        v = vals[0]
        return (v / MICRO if r.rule.metric == "cost" else float(v)), reset

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
