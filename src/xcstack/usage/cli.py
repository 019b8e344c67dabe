"""`xcstack quota list|set|delete`: usage quotas from the command line (docs/usage.md).

As the local administrator (whoever can run it can read the state store), with the API's checks and
codes (`QuotaCreate`, then `invalid_quota`, `unknown_group`, `unknown_subject`, `quota_not_found`), and
audited like the API (`usage.quota_create|update|delete`, actor `cli:<os user>`; refusals as failures).
A running server sees the change within `[usage] rules_reload_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from xcstack.config import load_settings

if TYPE_CHECKING:  # the services pull in the state store and the security capability: imported when run
    from xcstack.config import Settings
    from xcstack.security.service import SecurityService
    from xcstack.usage.service import UsageService


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("quota", help="usage quotas per key, user or group (as the local administrator)")
    qs = p.add_subparsers(dest="quota_command", required=True)
    x = qs.add_parser("list", help="every quota: from the config file and from the API or this command")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=_run(_list))
    x = qs.add_parser("set", help="add a quota, or change the limit of the one with the same scope, subject, "
                      "metric, period and kind")
    x.add_argument("scope", help="key, user or group")
    x.add_argument("subject", help="key id, user name or group name; '*': each of that scope on its own")
    x.add_argument("metric", help="requests, input_tokens, output_tokens, total_tokens or cost")
    x.add_argument("period", help="day or month (calendar, in [usage] timezone)")
    x.add_argument("limit", help="at least 0; cost in the price table's currency")
    x.add_argument("--soft", action="store_true", help="never refuse; alert at 80%% and 100%% instead")
    x.set_defaults(func=_run(_set))
    x = qs.add_parser("delete", help="remove a quota added through the API or this command")
    x.add_argument("id")
    x.set_defaults(func=_run(_delete))


Handler = Callable[[argparse.Namespace, "UsageService", "SecurityService"], Awaitable[int]]


def _run(fn: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from xcstack.errors import XCError

        settings = load_settings(args.config)
        try:
            return asyncio.run(_main(fn, args, settings))
        except XCError as exc:
            print(f"xcstack: {exc.message} ({exc.code})", file=sys.stderr)
            return 1

    return run


async def _main(fn: Handler, args: argparse.Namespace, settings: Settings) -> int:
    from xcstack.security.cli import cli_service
    from xcstack.usage.service import UsageService

    async with cli_service(settings) as sec:
        usage = UsageService(settings.usage, sec.store, sec.groups)
        try:
            await usage.ledger.migrate()
            await usage.reload_rules()
            return await fn(args, usage, sec)
        finally:
            await usage.quotas.close()


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


async def _list(args: argparse.Namespace, usage: UsageService, sec: SecurityService) -> int:
    items = await usage.quota_view(None)
    if args.json:
        print(json.dumps({"quotas": items, "timezone": usage.settings.timezone, "currency": usage.prices.currency},
                         ensure_ascii=False, indent=2))
        return 0
    for q in items:
        kind = "hard" if q["hard"] else "soft"
        print(f"{q['id']:<16} {q['source']:<6} {q['scope']:<5} {q['subject']:<24} {q['limit']:>14g} "
              f"{q['metric']:<13} per {q['period']:<5} {kind}")
    return 0


async def _set(args: argparse.Namespace, usage: UsageService, sec: SecurityService) -> int:
    from xcstack.errors import XCError
    from xcstack.httputil import parse_model
    from xcstack.usage.protocol import QuotaCreate
    from xcstack.usage.service import quota_rule

    raw = {"scope": args.scope, "subject": args.subject, "metric": args.metric, "period": args.period,
           "limit": args.limit, "hard": not args.soft}
    try:
        body = parse_model(raw, QuotaCreate)
        qid, old = await usage.set_quota(quota_rule(body), _actor())
    except XCError as exc:
        await sec.audit(_actor(), "usage.quota_create", "quota", "failure", None, {**raw, "code": str(exc.code)})
        raise
    detail = body.model_dump()
    if old is None:
        await sec.audit(_actor(), "usage.quota_create", f"quota:{qid}", "success", None, detail)
        print(f"quota {qid} added")
    else:
        await sec.audit(_actor(), "usage.quota_update", f"quota:{qid}", "success", None, {**detail, "old_limit": old})
        print(f"quota {qid}: limit {old:g} -> {body.limit:g}")
    return 0


async def _delete(args: argparse.Namespace, usage: UsageService, sec: SecurityService) -> int:
    from xcstack.errors import XCError

    try:
        await usage.delete_quota(args.id)
    except XCError as exc:
        await sec.audit(_actor(), "usage.quota_delete", f"quota:{args.id}", "failure", None, {"code": str(exc.code)})
        raise
    await sec.audit(_actor(), "usage.quota_delete", f"quota:{args.id}", "success")
    print(f"quota {args.id} deleted")
    return 0
