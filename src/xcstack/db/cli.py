"""`xcstack db ...`: check connectivity of every configured database, list the named queries.

`db check` resolves `secret:` references in DSNs like the server does, from the secret store that
`xcstack secret set` writes (opened as the other security commands open it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from xcstack.config import Settings, load_settings

if TYPE_CHECKING:  # the bridge pulls in drivers and the secret box (SM2/SM4): imported by the commands
    from xcstack.db.bridge import Bridge


async def _check(bridge: Bridge, wait: float, settings: Settings | None = None) -> list[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        secrets: Any = None
        refs = any(p.unresolved for db in bridge.databases.values() for p in db.pools)
        if refs and settings is not None and settings.security.enabled:
            from xcstack.security.cli import cli_service
            from xcstack.security.secrets import SecretStore

            svc = await stack.enter_async_context(cli_service(settings))
            secrets = SecretStore(svc.store, svc.box)
        return await _check_started(bridge, wait, secrets)


async def _check_started(bridge: Bridge, wait: float, secrets: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    t0 = time.monotonic()
    await bridge.start(wait=wait, secrets=secrets)
    try:
        for name, db in bridge.databases.items():
            for i, pool in enumerate(db.pools):
                row: dict[str, Any] = {"database": name, "shard": i, "driver": db.cfg.driver,
                                       "live": pool.live, "pool_size": db.cfg.pool_size,
                                       "sessions": [w.session for w in pool.workers if w.conn is not None]}
                row["ok"] = pool.live > 0
                out.append(row)
    finally:
        await bridge.stop()
    for row in out:
        row["seconds"] = round(time.monotonic() - t0, 3)
    return out


def _db_check(args: argparse.Namespace) -> int:
    from xcstack.db.bridge import Bridge

    settings = load_settings(args.config)
    if not settings.db.databases:
        print("no databases configured ([db.databases])")
        return 0
    rows = asyncio.run(_check(Bridge(settings.db), args.wait, settings))
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, default=str))
    else:
        for r in rows:
            state = "ok" if r["ok"] else "DOWN"
            print(f"{r['database']}#{r['shard']} ({r['driver']}): {state}, {r['live']}/{r['pool_size']} connections, "
                  f"sessions {r['sessions']}")
    return 0 if all(r["ok"] for r in rows) else 1


def _db_queries(args: argparse.Namespace) -> int:
    from xcstack.db.bridge import Bridge
    from xcstack.db.profiles import get_profile

    settings = load_settings(args.config)
    bridge = Bridge(settings.db)  # compiles every query: bad SQL templates fail here
    rows = []
    for dname, db in bridge.databases.items():
        prof = get_profile(db.cfg.driver)
        for qname, q in db.queries.items():
            rows.append({
                "endpoint": f"POST /v1/db/{dname}/{qname}", "permission": q.permission, "read_only": q.read_only,
                "params": {p: spec.type for p, (spec, _) in q.checkers.items()}, "max_rows": q.max_rows,
                "timeout_s": q.timeout_s, "shard_key": q.shard_key, "paramstyle": prof.paramstyle,
                "statements": len(q.statements),
            })
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        for r in rows:
            print(f"{r['endpoint']}  params={r['params']}  permission={r['permission']}  "
                  f"read_only={r['read_only']}  max_rows={r['max_rows']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("db", help="database bridge: check connections, list named queries")
    sub = p.add_subparsers(dest="db_command", required=True)
    c = sub.add_parser("check", help="connect every configured database (and shard); exit 1 if one is down")
    c.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the first connections")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_db_check)
    q = sub.add_parser("queries", help="list the named queries, their endpoints, parameters and permissions")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_db_queries)
