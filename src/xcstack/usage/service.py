"""The usage service: what the gateway calls around each request (`reserve` / `settle` / `cancel`), the
quota rules (config and state store), and the usage report over the ledger's roll-ups."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any, Protocol

from xcstack.errors import BadRequest, NotFound
from xcstack.state.store import StateStore, Tx
from xcstack.usage.counters import Counters, RedisCounters
from xcstack.usage.ledger import Ledger
from xcstack.usage.periods import Calendar
from xcstack.usage.prices import MICRO, PriceTable
from xcstack.usage.protocol import QuotaCreate, UsageCode
from xcstack.usage.quotas import Caller, Quotas, Rule, Ticket, caller_of
from xcstack.usage.settings import QuotaRule, UsageSettings

log = logging.getLogger("xcstack.usage")

GROUP_BY = ("key", "user", "group", "model", "upstream")
COLUMN = {"key": "key_id", "user": "user_id", "group": "group_name", "model": "model", "upstream": "upstream"}


def quota_rule(body: QuotaCreate) -> QuotaRule:
    """A quota as the API and the CLI take it; 400 `invalid_quota` for a negative limit."""
    if body.limit < 0:
        raise BadRequest("a quota's limit must be at least 0", code=UsageCode.INVALID_QUOTA, param="limit")
    return QuotaRule(**body.model_dump())


class Directory(Protocol):
    """Group and user look-ups (the security capability's `Services.groups`)."""

    async def group_exists(self, name: str) -> bool: ...

    async def user_id(self, name: str) -> str | None: ...


class UsageService:
    def __init__(self, settings: UsageSettings, store: StateStore, directory: Directory | None = None,
                 counters: Counters | None = None) -> None:
        self.settings = settings
        self.store = store
        self.directory = directory
        self.calendar = Calendar(settings.timezone)
        self.prices = PriceTable(settings.prices, settings.currency)
        if counters is None and settings.redis_url is not None:
            counters = RedisCounters(settings.redis_url.get_secret_value(), settings.redis_prefix,
                                     settings.redis_timeout_s)
        self.quotas = Quotas(settings, self.calendar, self.prices, counters)
        self.ledger = Ledger(store, self.calendar, flush_ms=settings.ledger_flush_ms,
                             batch_max=settings.ledger_batch_max, queue_max=settings.ledger_queue_max,
                             retention_days=settings.retention_days)
        self._rules_loaded = 0.0
        # user names quota rules give that named no user at the last reload, and the user ids already
        # checked against them (a user created later gets its quotas at its first call: `_new_user`)
        self._unresolved: set[str] = set()
        self._checked: set[str] = set()
        self._resolving = asyncio.Lock()

    # -- life cycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.ledger.migrate()
        await self.store.execute(
            "INSERT INTO usage_price_versions (version, currency, prices, first_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (version) DO NOTHING", (self.prices.version, self.prices.currency, self.prices.table_json,
                                                 time.time()))
        await self.reload_rules()
        self.ledger.start()

    async def stop(self) -> None:
        await self.ledger.stop()
        await self.quotas.close()

    async def reload_rules(self) -> None:
        unresolved: set[str] = set()
        rules: list[Rule] = []
        for i, q in enumerate(self.settings.quotas):
            rules.append(Rule(f"config-{i + 1}", q, "config", await self._subject_id(q, unresolved)))
        for r in await self.store.fetchall("SELECT * FROM usage_quotas ORDER BY created_at"):
            q = QuotaRule(scope=r["scope"], subject=r["subject"], metric=r["metric"], period=r["period"],
                          limit=float(r["qlimit"]), hard=bool(r["hard"]))
            rules.append(Rule(r["id"], q, "api", await self._subject_id(q, unresolved)))
        self.quotas.set_rules(rules)
        self._rules_loaded = time.monotonic()
        if unresolved != self._unresolved:
            for name in unresolved - self._unresolved:
                log.warning("usage: a quota names user %r, who does not exist (yet); it applies from that "
                            "user's first call once created", name)
            self._unresolved = unresolved
            self._checked = set()

    async def _subject_id(self, q: QuotaRule, unresolved: set[str]) -> str:
        """The subject as counted: a user's id (its name, noted in `unresolved`, while it names nobody)."""
        if q.scope != "user" or q.subject == "*" or self.directory is None:
            return q.subject
        uid = await self.directory.user_id(q.subject)
        if uid is None:
            unresolved.add(q.subject)
        return uid or q.subject

    async def _new_user(self, user: str) -> None:
        """A caller whose user id was not seen since a quota named a user that did not exist: when one of
        those names exists now (a user created after the rules were loaded, on any node, through the API
        or the CLI), reload the rules before this call reserves. One look-up per such name and new user
        id; nothing at all while every named user exists."""
        async with self._resolving:
            if user in self._checked or not self._unresolved:
                return
            assert self.directory is not None
            for name in sorted(self._unresolved):
                if await self.directory.user_id(name) is not None:
                    await self.reload_rules()
                    break
            if len(self._checked) > 100_000:
                self._checked.clear()
            self._checked.add(user)

    # -- the gateway's calls --------------------------------------------------------------------------
    async def reserve(self, scope: Any, endpoint: str, model: str, est_in: int,
                      max_tokens: int | None) -> Ticket:
        """Before admission: raises 429 `quota_exceeded` (a ledger record of the refusal is kept)."""
        if time.monotonic() - self._rules_loaded > self.settings.rules_reload_s:
            self._rules_loaded = time.monotonic()  # one reload at a time; another node's new quota applies
            try:
                await self.reload_rules()
            except Exception as exc:
                log.error("usage: reloading quota rules failed: %r", exc)
        out = max_tokens if max_tokens is not None else self.settings.output_reserve_tokens
        t = Ticket(caller_of(scope), model, endpoint, est_in, out if endpoint != "embeddings" else 0,
                   time.monotonic(), scope, request_id=scope.get("xc.request_id"))
        if self._unresolved and t.caller.user and t.caller.user not in self._checked:
            try:
                await self._new_user(t.caller.user)
            except Exception as exc:
                log.error("usage: resolving the users quotas name failed: %r", exc)
        try:
            await self.quotas.reserve(t)
        except Exception as exc:
            t.done = True
            self._record(t, getattr(exc, "status", 500), 0, 0)
            raise
        return t

    async def settle(self, t: Ticket, status: int) -> None:
        """After the call: charge what was used (the upstream's usage, else an estimate marked as such);
        a call that never reached an upstream is given back whole. One ledger record either way."""
        if t.done:
            return
        t.done = True
        served = bool(t.upstream)
        if t.prompt_tokens is None:
            if served and status < 400:
                t.record_usage(t.est_in, 0, estimated=True)
            else:
                t.record_usage(0, 0)
        tin, tout = t.prompt_tokens or 0, t.completion_tokens or 0
        try:
            await self.quotas.settle(t, tin, tout, counted=served)
        finally:
            self._record(t, status, tin, tout)

    async def cancel(self, t: Ticket | None, status: int) -> None:
        """Not served (refused at admission, client gone while queued): give everything back."""
        if t is not None:
            t.upstream = ""
            await self.settle(t, status)

    def _record(self, t: Ticket, status: int, tin: int, tout: int) -> None:
        c = t.caller
        self.ledger.enqueue((time.time(), c.key, c.user, c.group, t.model, t.upstream, t.endpoint, tin, tout,
                             self.prices.micro(t.model, tin, tout), self.prices.version, int(t.estimated), status,
                             round((time.monotonic() - t.t0) * 1000, 3), t.request_id or ""))

    # -- quotas through the API -----------------------------------------------------------------------
    async def add_quota(self, q: QuotaRule, actor: str) -> str:
        await self.check_quota(q)
        qid = "q-" + uuid.uuid4().hex[:12]
        await self.store.execute(
            "INSERT INTO usage_quotas (id, scope, subject, metric, period, qlimit, hard, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (qid, q.scope, q.subject, q.metric, q.period, q.limit, int(q.hard), time.time(), actor))
        await self.reload_rules()
        return qid

    async def set_quota(self, q: QuotaRule, actor: str) -> tuple[str, float | None]:
        """Add a quota, or change the limit of the stored one with the same scope, subject, metric,
        period and kind (hard or soft): (its id, the previous limit or None when added)."""
        await self.check_quota(q)
        row = await self.store.fetchone(
            "SELECT id, qlimit FROM usage_quotas WHERE scope = ? AND subject = ? AND metric = ? AND period = ? "
            "AND hard = ? ORDER BY created_at LIMIT 1", (q.scope, q.subject, q.metric, q.period, int(q.hard)))
        if row is None:
            return await self.add_quota(q, actor), None
        await self.store.execute("UPDATE usage_quotas SET qlimit = ? WHERE id = ?", (q.limit, row["id"]))
        await self.reload_rules()
        return str(row["id"]), float(row["qlimit"])

    async def check_quota(self, q: QuotaRule) -> None:
        """400 `invalid_quota` for a negative limit, `unknown_group` / `unknown_subject` for a group or user
        that does not exist (the API's and the CLI's checks)."""
        if q.limit < 0:
            raise BadRequest("a quota's limit must be at least 0", code=UsageCode.INVALID_QUOTA, param="limit")
        if q.scope == "group" and q.subject != "*" and self.directory is not None \
                and not await self.directory.group_exists(q.subject):
            raise BadRequest(f"no group {q.subject!r}", code=UsageCode.UNKNOWN_GROUP, param="subject")
        if q.scope == "user" and q.subject != "*" and self.directory is not None \
                and await self.directory.user_id(q.subject) is None:
            raise BadRequest(f"no user {q.subject!r}", code=UsageCode.UNKNOWN_SUBJECT, param="subject")

    async def delete_quota(self, qid: str) -> None:
        if await self.store.execute("DELETE FROM usage_quotas WHERE id = ?", (qid,)) == 0:
            raise NotFound(f"no quota {qid!r} (quotas from the config file are changed there)",
                           code=UsageCode.QUOTA_NOT_FOUND)
        await self.reload_rules()

    async def quota_view(self, caller: Caller | None) -> list[dict[str, Any]]:
        """Every rule; with `caller`, those that apply to it with its use and reset time."""
        rules = self.quotas.applicable(caller) if caller is not None else self.quotas.rules
        out = []
        for r in rules:
            q = r.rule
            item: dict[str, Any] = {"id": r.id, "scope": q.scope, "subject": q.subject, "metric": q.metric,
                                    "period": q.period, "limit": q.limit, "hard": q.hard, "source": r.source}
            if caller is not None:
                used, reset = await self.quotas.used(r, caller)
                item["used"] = used
                item["reset_at"] = self.calendar.iso(reset)
            out.append(item)
        return out

    # -- the report -----------------------------------------------------------------------------------
    def parse_range(self, start: str | None, end: str | None, granularity: str) -> tuple[float, float]:
        """`from`/`to` (ISO 8601 date or date-time, local time zone when naive; default: this month so
        far) -> epoch seconds; 400 on a malformed value, from > to, or a range over the granularity's limit."""
        def parse(v: str, name: str) -> float:
            try:
                d = datetime.fromisoformat(v)
            except ValueError:
                raise BadRequest(f"{name}: not an ISO 8601 date or date-time: {v[:40]!r}",
                                 code=UsageCode.INVALID_PERIOD, param=name) from None
            if d.tzinfo is None:
                d = d.replace(tzinfo=self.calendar.tz)
            return d.timestamp()

        now = time.time()
        if start:
            t0 = parse(start, "from")
        else:
            t0 = datetime.fromtimestamp(now, self.calendar.tz).replace(day=1, hour=0, minute=0, second=0,
                                                                       microsecond=0).timestamp()
        t1 = parse(end, "to") if end else now
        if t0 > t1:
            raise BadRequest("from is after to", code=UsageCode.INVALID_RANGE, param="from")
        limit = self.settings.max_range_days.get(granularity, 400)
        if t1 - t0 > limit * 86400:
            raise BadRequest(f"the range is over {limit} days for granularity {granularity}",
                             code=UsageCode.RANGE_TOO_LARGE, param="to")
        return t0, t1

    async def report(self, t0: float, t1: float, granularity: str, group_by: list[str],
                     user: str | None, group: str | None = None) -> list[dict[str, Any]]:
        """Sums per period (and the `group_by` dimensions) from the roll-ups; `user`: that user's only."""
        dims = [COLUMN[g] for g in group_by]
        if granularity == "hour":
            table, bucket = "usage_hourly", "hour"
            lo, hi = int(t0) // 3600 * 3600, int(t1)
            period_sql = "hour"
        else:
            table, bucket = "usage_daily", "day"
            lo, hi = self.calendar.day(t0), self.calendar.day(t1)  # type: ignore[assignment]
            period_sql = "day" if granularity == "day" else "substr(day, 1, 7)"
        where = [f"{bucket} >= ?", f"{bucket} <= ?"]
        params: list[Any] = [lo, hi]
        if user is not None:
            where.append("user_id = ?")
            params.append(user)
        if group is not None:
            where.append("group_name = ?")
            params.append(group)
        cols = ", ".join([f"{period_sql} AS period", *dims])
        sql = (f"SELECT {cols}, SUM(requests) AS requests, SUM(input_tokens) AS input_tokens, "
               f"SUM(output_tokens) AS output_tokens, SUM(cost_micro) AS cost_micro, SUM(estimated) AS estimated "
               f"FROM {table} WHERE {' AND '.join(where)} GROUP BY {', '.join([period_sql, *dims])} "
               f"ORDER BY {', '.join([period_sql, *dims])}")
        rows = await self.store.fetchall(sql, params)
        out = []
        for r in rows:
            period = r["period"]
            if granularity == "hour":
                period = self.calendar.iso(float(period))
            item: dict[str, Any] = {"period": str(period)}
            for g, col in zip(group_by, dims, strict=True):
                item[g] = r[col]
            item.update(requests=int(r["requests"]), input_tokens=int(r["input_tokens"]),
                        output_tokens=int(r["output_tokens"]), cost=int(r["cost_micro"]) / MICRO,
                        estimated=int(r["estimated"]))
            out.append(item)
        return out

    async def price_table(self, version: str) -> dict[str, Any] | None:
        def run(tx: Tx) -> dict[str, Any] | None:
            return tx.fetchone("SELECT * FROM usage_price_versions WHERE version = ?", (version,))

        row = await self.store.transaction(run)
        return None if row is None else {"version": row["version"], "currency": row["currency"],
                                         "prices": json.loads(row["prices"])["prices"]}
