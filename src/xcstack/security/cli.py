"""`xcstack user ...`, `xcstack group ...`, `xcstack audit verify|accept-tail|export|prune`,
`xcstack trust seal|verify`.

User commands act as the local system administrator (whoever can run them can read the state
store) and are audited like HTTP administration (actor `cli:<os user>`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xcstack.config import load_settings
from xcstack.errors import XCError

if TYPE_CHECKING:
    from xcstack.config import Settings
    from xcstack.security.service import SecurityService


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # -- user --
    us = _commands(sub, "user", "users, roles, passwords, TOTP (as the local administrator)")
    _verb(us, "list", _user_list, "list users")
    x = _verb(us, "create", _user_create, "create a user; prints a one-time password", "name")
    x.add_argument("--role", action="append", default=[], help="role (repeatable)")
    x.add_argument("--kind", choices=["human", "service"], default="human")
    for verb in ("disable", "enable", "delete", "reset-password", "reset-totp"):
        _verb(us, verb, _user_action, f"{verb.replace('-', ' ')} a user", "name", verb=verb)
    _verb(us, "set-roles", _user_roles, "replace a user's roles", "name").add_argument("roles", nargs="*")
    x = _verb(us, "totp", _user_totp, "enrol TOTP: prints the otpauth URI and a terminal QR code", "name")
    x.add_argument("--code", help="first code from the authenticator (asked for when omitted)")
    _verb(us, "bootstrap", _user_bootstrap, "create the three administrators if no user exists yet")
    ks = _commands(us, "key", "API keys of a user, issued offline (for bootstrapping machine clients)",
                dest="key_command")
    x = _verb(ks, "create", _user_key_create, "issue an API key owned by USER (prints it once)")
    x.add_argument("name", metavar="USER")
    x.add_argument("--role", action="append", default=[], required=True, help="role the key carries (repeatable; "
                   "the user must hold its rights)")
    x.add_argument("--days", type=int, default=None, help="lifetime in days (default: security.api_key_max_days)")
    x.add_argument("--key-name", default=None, help="the key's name (default: USER-cli)")
    x = _verb(ks, "group", _key_group, "give an API key a group of its own (--none: back to its owner's)")
    x.add_argument("id", help="the key's id")
    _group_or_none(x, "no group of its own")
    x = _verb(us, "group", _user_group, "put a user in a group (--none: in none)", "name")
    _group_or_none(x, "take the user out of its group")
    # -- groups --
    gs = _commands(sub, "group", "groups (部门/租户) of users and API keys (as the local administrator)")
    _verb(gs, "list", _group_list, "the groups with their numbers of users and API keys").add_argument(
        "--json", action="store_true")
    _verb(gs, "create", _group_create, "create a group", "name").add_argument("--description", default="")
    _verb(gs, "delete", _group_delete, "delete a group without members", "name")
    # -- secrets --
    ss = _commands(sub, "secret", "named secrets at rest (SM4-GCM): reference them in config as secret:NAME")
    _verb(ss, "set", _secret_set, "store a secret (asked for without echo; or --stdin)", "name").add_argument(
        "--stdin", action="store_true", help="read the value from standard input")
    _verb(ss, "list", _secret_list, "names of the stored secrets (never the values)")
    _verb(ss, "delete", _secret_delete, "delete a secret", "name")
    # -- audit (offline: the chain files, no service) --
    aus = _commands(sub, "audit", "the audit log")
    x = _verb(aus, "verify", _audit_verify, "verify every chain; exit 1 naming the first bad position",
              needs_service=False)
    x.add_argument("--dir", type=Path, help="audit directory (default from config)")
    x.add_argument("--chain", help="only this chain")
    x.add_argument("--no-signatures", action="store_true", help="skip SM2 checkpoint signature checks")
    x.add_argument("--archive", type=Path, metavar="DIR",
                   help="verify an exported archive instead (offline: public keys from the config's keystore)")
    x.add_argument("--json", action="store_true")
    x = _verb(aus, "accept-tail", _audit_accept_tail,
              "accept a chain's unsigned tail after inspecting it (audited, then signed)", needs_service=False)
    x.add_argument("--dir", type=Path, help="audit directory (default from config)")
    x.add_argument("--chain", required=True)
    x.add_argument("--through", type=int, required=True, help="the tail's last seq, as `audit verify` shows it")
    x.add_argument("--reason", default="", help="why it is genuine (kept in the audit.tail_accepted record)")
    x = _verb(aus, "export", _audit_export, "send records after the persisted cursor to a collector, or copy "
              "sealed segments to an archive directory", needs_service=False)
    x.add_argument("--syslog", help="tcp://host:port (RFC 5424)")
    x.add_argument("--http", help="http(s)://collector/path")
    x.add_argument("--archive", type=Path, metavar="DIR",
                   help="copy the sealed (closed, signed, compressed) segments of every chain into DIR (incremental)")
    x.add_argument("--dir", type=Path)
    _verb(aus, "prune", _audit_prune, "seal closed segments and delete those past retention_days in chains no "
          "process is writing (each deletion audited)", needs_service=False).add_argument("--dir", type=Path)
    # -- trust --
    ts = _commands(sub, "trust", "trusted boot: seal or verify the installation")
    _verb(ts, "seal", _trust_seal, "write the SM2-signed manifest of SM3 hashes", needs_service=False)
    _verb(ts, "verify", _trust_verify, "check the installation against the manifest", needs_service=False)


def _commands(sub: argparse._SubParsersAction, name: str, help: str,  # type: ignore[type-arg]
           dest: str | None = None) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """A command whose subcommands are required (`xcstack NAME VERB ...`); the chosen verb lands in
    `NAME_command` (or `dest`)."""
    p = sub.add_parser(name, help=help)
    return p.add_subparsers(dest=dest or f"{name}_command", required=True)


def _verb(subs: argparse._SubParsersAction, name: str, fn: Handler, help: str,  # type: ignore[type-arg]
          *positional: str, needs_service: bool = True, **defaults: Any) -> argparse.ArgumentParser:
    """A subcommand that runs `fn` (see `_cmd`), with its `positional` arguments; returned for the options."""
    x: argparse.ArgumentParser = subs.add_parser(name, help=help)
    for arg in positional:
        x.add_argument(arg)
    x.set_defaults(func=_cmd(fn, needs_service=needs_service), **defaults)
    return x


def _group_or_none(x: argparse.ArgumentParser, none_help: str) -> None:
    """GROUP or --none (one of the two: `_target_group` checks it as the API's `GroupAssign` body)."""
    x.add_argument("group", nargs="?")
    x.add_argument("--none", action="store_true", help=none_help)


Handler = Callable[[argparse.Namespace, "Settings", Any], Awaitable[int]]


def _cmd(fn: Handler, needs_service: bool = True) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = load_settings(args.config)

        async def main() -> int:
            if not needs_service:
                return await fn(args, settings, None)
            async with cli_service(settings) as svc:
                return await fn(args, settings, svc)

        from xcstack.security.audit.log import AuditIntegrityError

        try:
            return asyncio.run(main())
        except XCError as exc:
            print(f"xcstack: {exc.message} ({exc.code})", file=sys.stderr)
            return 1
        except AuditIntegrityError as exc:
            print(f"xcstack: {exc}", file=sys.stderr)
            return 1

    return run


@contextlib.asynccontextmanager
async def cli_service(settings: Settings) -> AsyncIterator[SecurityService]:
    from xcstack.security.audit.log import AuditLog
    from xcstack.security.keys import KeyVerifier, offline_signer
    from xcstack.security.lockout import Lockout, RedisLockout, StateLockout
    from xcstack.security.secretbox import SecretBox, ServiceSecretBox
    from xcstack.security.service import SecurityService
    from xcstack.state.store import StateStore

    s = settings.security
    url = settings.state.url.get_secret_value() if settings.state.url else None
    store = StateStore(url, settings.data_dir, pool_size=2)
    async with offline_signer(settings) as signer:
        box: SecretBox
        client = getattr(signer, "_client", None)
        if client is not None:
            from xcstack.security.capability import SECRETBOX_KEY
            from xcstack.security.keys import ensure_key

            await ensure_key(client, SECRETBOX_KEY, "sm4")
            box = ServiceSecretBox(client, SECRETBOX_KEY)
        else:
            from xcstack.security.capability import local_secretbox

            box = local_secretbox(settings)
        lockout: Lockout = (RedisLockout(s.redis_url.get_secret_value(), s.redis_prefix, s.lockout_threshold,
                                         s.lockout_s)
                            if s.redis_url else StateLockout(store, s.lockout_threshold, s.lockout_s))
        audit = AuditLog(Path(s.audit.dir or settings.data_dir / "audit"), s.audit, signer=signer,
                         sig_verify=KeyVerifier(settings))
        await audit.open()
        svc = SecurityService(s, store, box, lockout, audit)
        try:
            await svc.init()
            yield svc
        finally:
            await audit.close()
            await lockout.close()
            await store.close()


def _actor() -> Any:
    from xcstack.security.principal import Principal

    return Principal("cli", f"cli:{getpass.getuser()}", (), kind="system")


async def _user_list(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    for u in await svc.list_users():
        flags = [f for f, on in (("disabled", u["disabled"]), ("must-change", u["must_change_password"]),
                                 ("totp", u["totp_enabled"])) if on]
        print(f"{u['name']:<24} {u['kind']:<8} {','.join(u['roles']) or '-':<24} {' '.join(flags)}")
    return 0


async def _user_create(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    _, one_time = await svc.create_user(_actor(), args.name, args.role, args.kind)
    print(f"user {args.name} created; one-time password (shown once, must be changed at first login):")
    print(f"  {one_time}")
    return 0


async def _user_action(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    actor = _actor()
    if args.verb in ("disable", "enable"):
        await svc.set_disabled(actor, args.name, args.verb == "disable")
    elif args.verb == "delete":
        await svc.delete_user(actor, args.name)
    elif args.verb == "reset-password":
        pw = await svc.reset_password(actor, args.name)
        print(f"one-time password for {args.name} (shown once, must be changed at next login):\n  {pw}")
    elif args.verb == "reset-totp":
        await svc.totp_reset(actor, args.name)
    print(f"{args.verb}: {args.name}: done")
    return 0


async def _user_roles(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    await svc.set_roles(_actor(), args.name, list(args.roles))
    print(f"roles of {args.name}: {', '.join(args.roles) or '(none)'}")
    return 0


async def _user_totp(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    from xcstack.security.principal import Principal

    user = await svc.get_user(args.name)
    if user is None:
        print(f"xcstack: no user {args.name!r}", file=sys.stderr)
        return 1
    who = Principal(user["id"], user["name"], tuple(json.loads(user["roles"])))
    info = await svc.totp_begin(who)
    print(info["qr"])
    print(f"otpauth URI: {info['otpauth_uri']}")
    code = args.code or (await asyncio.to_thread(input, "first 6-digit code from the authenticator: ")).strip()
    codes = await svc.totp_confirm(who, code)
    print("TOTP enabled. Recovery codes (each works once; store them offline, they are shown once):")
    for c in codes:
        print(f"  {c}")
    return 0


async def _user_key_create(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    """The API path's rules, as the owning user (a key never carries a right its owner lacks), plus a record
    naming the operator who issued it from the console."""
    from xcstack.security.principal import Principal

    user = await svc.get_user(args.name)
    if user is None or user["disabled"]:
        print(f"xcstack: no enabled user {args.name!r}", file=sys.stderr)
        return 1
    owner = Principal(user["id"], user["name"], tuple(json.loads(user["roles"])))
    out = await svc.create_api_key(owner, args.key_name or f"{args.name}-cli", list(args.role), args.days)
    await svc.audit(_actor().name, "apikey.issue_offline", f"apikey:{out['id']}", "success", None,
                    {"owner": args.name, "roles": out["roles"]})
    print(f"API key {out['id']} for {args.name} (roles {', '.join(out['roles'])}; shown once):")
    print(f"  {out['key']}")
    return 0


def _target_group(args: argparse.Namespace) -> str | None:
    """GROUP or --none, validated as the API's body (`GroupAssign`): the same 400 codes."""
    from xcstack.errors import BadRequest, CoreCode
    from xcstack.httputil import parse_model
    from xcstack.security.protocol import GroupAssign

    if (args.group is None) == (not args.none):
        raise BadRequest("give a GROUP or --none", code=CoreCode.INVALID_PARAMETER, param="group")
    return parse_model({"group": args.group}, GroupAssign).group


async def _user_group(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    group = _target_group(args)
    await svc.groups.assign_user(_actor(), args.name, group)
    print(f"user {args.name}: group {group or '(none)'}")
    return 0


async def _key_group(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    group = _target_group(args)
    await svc.groups.assign_key(_actor(), args.id, group)
    print(f"API key {args.id}: group {group or '(its owner’s)'}")
    return 0


async def _group_list(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    groups = await svc.groups.list()
    if args.json:
        print(json.dumps(groups, ensure_ascii=False, indent=2))
        return 0
    for g in groups:
        print(f"{g['name']:<24} users {g['users']:<5} keys {g['keys']:<5} {g['description']}")
    return 0


async def _group_create(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    from xcstack.httputil import parse_model
    from xcstack.security.protocol import GroupCreate

    body = parse_model({"name": args.name, "description": args.description}, GroupCreate)
    await svc.groups.create(_actor(), body.name, body.description)
    print(f"group {body.name} created")
    return 0


async def _group_delete(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    await svc.groups.delete(_actor(), args.name)
    print(f"group {args.name} deleted")
    return 0


async def _user_bootstrap(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    created = await svc.bootstrap()
    if not created:
        print("users exist already; nothing created")
        return 0
    print("administrator accounts created (三权分立); one-time passwords, shown once:")
    for name, role, pw in created:
        print(f"  {name:<10} role {role:<9} password {pw}")
    return 0


def _secret_store(svc: SecurityService) -> Any:
    from xcstack.security.secrets import SecretStore

    return SecretStore(svc.store, svc.box)


async def _secret_set(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    from xcstack.security.secretbox import zero

    store = _secret_store(svc)
    store.check_name(args.name)
    if args.stdin:
        raw = await asyncio.to_thread(sys.stdin.buffer.read)
        value = bytearray(raw.rstrip(b"\r\n"))
    else:
        value = bytearray((await asyncio.to_thread(getpass.getpass, f"value of {args.name}: ")).encode())
    if not value:
        print("xcstack: empty value", file=sys.stderr)
        return 2
    try:
        await store.set(args.name, value)
    finally:
        zero(value)
    await svc.audit(_actor().name, "secret.set", f"secret:{args.name}", "success")
    print(f"secret {args.name} stored (SM4-GCM); reference it in config as \"secret:{args.name}\"")
    return 0


async def _secret_list(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    for row in await _secret_store(svc).names():
        print(row["name"])
    return 0


async def _secret_delete(args: argparse.Namespace, settings: Settings, svc: SecurityService) -> int:
    if not await _secret_store(svc).delete(args.name):
        print(f"xcstack: no secret named {args.name!r}", file=sys.stderr)
        return 1
    await svc.audit(_actor().name, "secret.delete", f"secret:{args.name}", "success")
    print(f"secret {args.name} deleted")
    return 0


async def _audit_verify(args: argparse.Namespace, settings: Settings, _: Any) -> int:
    from xcstack.security.audit.files import list_chains
    from xcstack.security.audit.verify import verify_chain
    from xcstack.security.keys import KeyVerifier

    root = args.archive or args.dir or settings.security.audit.dir or settings.data_dir / "audit"
    chains = [c for c in list_chains(Path(root)) if args.chain is None or c.name == args.chain]
    if not chains:
        print(f"xcstack: no audit chains under {root}", file=sys.stderr)
        return 1
    verifier = None if args.no_signatures else KeyVerifier(settings)
    reports = [await verify_chain(c, verifier, workers=0, archive=args.archive is not None) for c in chains]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False))
    else:
        for r in reports:
            status = "OK " if r.ok else "BAD"
            sig = "signatures checked" if r.signatures_checked else "signatures NOT checked"
            span = f"seq {r.first_seq}..{r.last_seq}" if r.last_seq >= r.first_seq else "none"
            verified = "records" if r.ok else "records verified before the problem"
            print(f"{status} chain {r.chain}: {r.records} {verified} ({span}), "
                  f"{r.checkpoints} checkpoints (signed up to {r.signed_seq}, {sig})")
            for w in r.warnings:
                print(f"    warning: {w}")
            if r.problem is not None:
                print(f"    {r.problem}")
    return 0 if all(r.ok for r in reports) else 1


async def _audit_accept_tail(args: argparse.Namespace, settings: Settings, _: Any) -> int:
    """The operator's answer to a start refused over an unsigned tail (a crash's, once inspected):
    the chain must verify up to its last signed checkpoint and end at `--through`; the acceptance
    is itself an audit record (`audit.tail_accepted`, actor cli:<user>) that the next checkpoint signs."""
    from xcstack.security.audit.log import AuditLog
    from xcstack.security.keys import KeyVerifier, offline_signer

    a = settings.security.audit
    root = Path(args.dir or a.dir or settings.data_dir / "audit")
    if not (root / args.chain).is_dir():
        print(f"xcstack: no audit chain {args.chain!r} under {root}", file=sys.stderr)
        return 1
    async with offline_signer(settings) as signer:
        audit = AuditLog(root, a, chain=args.chain, signer=signer, sig_verify=KeyVerifier(settings))
        await audit.open(accept_through=args.through, actor=_actor().name, reason=args.reason)
        accepted = audit._accepted
        await audit.close()
    assert accepted is not None
    print(f"chain {args.chain}: records {accepted['first_seq']}..{accepted['last_seq']} accepted "
          "(audit.tail_accepted written and signed)")
    return 0


async def _audit_prune(args: argparse.Namespace, settings: Settings, _: Any) -> int:
    """Retention for chains no server process writes (a stopped node, a retired worker's chain): the
    chain is opened like a writer would (start check, `audit.start`), its closed segments sealed and
    compressed, those past `retention_days` deleted with an `audit.purge` record each, then closed
    with a signed checkpoint. Live chains are pruned by their own writer (hourly)."""
    from xcstack.security.audit.files import chain_is_live, list_chains
    from xcstack.security.audit.log import AuditLog
    from xcstack.security.keys import KeyVerifier, offline_signer

    a = settings.security.audit
    root = Path(args.dir or a.dir or settings.data_dir / "audit")
    async with offline_signer(settings) as signer:
        for chain in list_chains(root):
            if chain_is_live(chain):
                print(f"chain {chain.name}: written by a running process (it prunes itself)")
                continue
            audit = AuditLog(root, a, chain=chain.name, signer=signer, sig_verify=KeyVerifier(settings))
            await audit.open()
            try:
                await audit.archive()
                purged = await audit.purge_expired()
            finally:
                await audit.close()
            print(f"chain {chain.name}: {len(purged)} segments pruned" + (f" ({', '.join(purged)})" if purged else ""))
    return 0


async def _audit_export(args: argparse.Namespace, settings: Settings, _: Any) -> int:
    from xcstack.security.audit.export import Exporter, HttpSink, Sink, SyslogTcpSink
    from xcstack.security.audit.files import list_chains

    a = settings.security.audit
    root = Path(args.dir or a.dir or settings.data_dir / "audit")
    if args.archive is not None:
        from xcstack.security.audit.archive import export_chain

        for chain in list_chains(root):
            r = await asyncio.to_thread(export_chain, chain, args.archive)
            print(f"chain {r.chain}: archive holds seq ..{r.last_seq} ({len(r.copied)} files copied, "
                  f"{r.kept} already there)")
        if not (args.syslog or args.http):
            return 0
    syslog, http = args.syslog or a.export_syslog, args.http or a.export_http
    if not syslog and not http:
        print("xcstack: give --syslog and/or --http (or [security.audit] export_*), or --archive DIR", file=sys.stderr)
        return 2
    total = 0
    for chain in list_chains(root):
        sinks: list[Sink] = []
        if syslog:
            sinks.append(SyslogTcpSink(syslog, a.export_timeout_s))
        if http:
            sinks.append(HttpSink(http, a.export_timeout_s))
        for sink in sinks:
            try:
                n = await Exporter(chain, sink, a.export_batch).run_once()
            finally:
                await sink.close()
            print(f"chain {chain.name} -> {sink.name}: {n} records")
            total += n
    return 0


async def _trust_seal(args: argparse.Namespace, settings: Settings, _: Any) -> int:
    from xcstack.security.keys import offline_signer
    from xcstack.security.trust import manifest_path, seal

    async with offline_signer(settings) as signer:
        manifest = await seal(settings, signer, args.config)
    print(f"sealed {len(manifest['files'])} files into {manifest_path(settings)} (key {manifest['key_id']})")
    return 0


async def _trust_verify(args: argparse.Namespace, settings: Settings, _: Any) -> int:
    from xcstack.security.keys import KeyVerifier
    from xcstack.security.trust import verify

    report = await verify(settings, KeyVerifier(settings))
    if report.ok:
        print(f"OK: {report.files} files match the signed manifest")
        return 0
    for p in report.problems:
        print(f"MISMATCH {p}")
    return 1
