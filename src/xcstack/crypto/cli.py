"""`xcstack key create|list|rotate|export-public`.

Key management goes through the HSM owner when it is running (it is the only process that may
open the device); otherwise the CLI opens the keystore and backend itself (soft backend, or a
device while the server is stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from xcstack.config import Settings, load_settings
from xcstack.errors import XCError


async def _with_client(settings: Settings, fn: Any) -> Any:
    from xcstack.crypto.client import CryptoClient, DirectClient, OwnerClient
    from xcstack.crypto.errors import CryptoUnavailable
    from xcstack.crypto.owner import build_service, socket_path

    client: CryptoClient | None = None
    if settings.crypto.access == "owner" and socket_path(settings).exists():
        owner = OwnerClient(socket_path(settings), settings.crypto, reconnect_window_s=0.0)
        try:
            await owner.call("ping")
            client = owner
        except CryptoUnavailable:
            await owner.close()
    if client is None:

        async def factory() -> Any:
            return await build_service(settings)

        client = DirectClient(factory)
    try:
        return await fn(client)
    finally:
        service = getattr(client, "_service", None)
        await client.close()
        if service is not None:
            await service.keystore.store.close()


def _run(args: argparse.Namespace, fn: Any) -> int:
    settings = load_settings(args.config)
    try:
        result = asyncio.run(_with_client(settings, fn))
    except XCError as exc:
        print(f"xcstack key: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    if result is not None:
        print(result)
    return 0


def _create(args: argparse.Namespace) -> int:
    async def go(c: Any) -> str:
        rec = await c.create_key(args.name, args.kind)
        return f"created {rec['name']} v{rec['version']} ({rec['kind']}, {rec['algorithm']}, backend {rec['backend']})"

    return _run(args, go)


def _rotate(args: argparse.Namespace) -> int:
    async def go(c: Any) -> str:
        rec = await c.rotate_key(args.name)
        return f"rotated {rec['name']} -> v{rec['version']} (older versions stay for verify/decrypt)"

    return _run(args, go)


def _list(args: argparse.Namespace) -> int:
    async def go(c: Any) -> str:
        keys = await c.list_keys()
        if args.json:
            return json.dumps(keys, indent=2)
        if not keys:
            return "no keys"
        lines = [f"{'NAME':<32} {'KIND':<9} {'VER':>4} {'VERS':>4}  ALGORITHM / BACKEND"]
        for k in keys:
            head = f"{k['name']:<32} {k['kind']:<9} {k['version']:>4} {k['versions']:>4}"
            lines.append(f"{head}  {k['algorithm']} / {k['backend']}")
        return "\n".join(lines)

    return _run(args, go)


def _export(args: argparse.Namespace) -> int:
    async def go(c: Any) -> str:
        rec = await c.public_key(args.name, args.version)
        if args.format == "hex":
            return str(rec["public_key"])
        return str(rec["pem"]).rstrip("\n")

    return _run(args, go)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("key", help="manage crypto keys (SM2/SM4/HMAC-SM3; named and versioned)")
    sub = p.add_subparsers(dest="key_command", required=True)

    c = sub.add_parser("create", help="create a key (version 1)")
    c.add_argument("name")
    c.add_argument("--kind", choices=["sm2", "sm4", "hmac-sm3"], default="sm2")
    c.set_defaults(func=_create)

    ls = sub.add_parser("list", help="list keys (newest version and number of versions)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    r = sub.add_parser("rotate", help="add a new version; older versions stay for verify/decrypt")
    r.add_argument("name")
    r.set_defaults(func=_rotate)

    e = sub.add_parser("export-public", help="print the public key (PEM SubjectPublicKeyInfo or hex)")
    e.add_argument("name")
    e.add_argument("--version", type=int, default=None)
    e.add_argument("--format", choices=["pem", "hex"], default="pem")
    e.set_defaults(func=_export)
