"""`xcstack label verify | batch`: check a content label offline with the public key only (its
inclusion proof and its batch's SM2 signature), and look up a signed batch in the batch log."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("label", help="content labels (GB 45438-2025) of generated answers")
    lsub = p.add_subparsers(dest="label_cmd", required=True)
    v = lsub.add_parser("verify", help="verify a label: the X-XC-Content-Label header value, or a JSON answer/"
                        "xc_label object")
    v.add_argument("label", help="the label text, or @FILE to read it from a file ('-': stdin)")
    v.add_argument("--public-key", required=True, type=Path, help="PEM file of the SM2 public key "
                   "(`xcstack key export-public content-label`)")
    v.add_argument("--batch-log", type=Path, help="also require the label's batch in this batch log directory "
                   "(<data_dir>/labels)")
    v.set_defaults(func=_verify)
    b = lsub.add_parser("batch", help="print a signed batch's record from the batch log")
    b.add_argument("batch", help="the batch id (a label's proof.batch)")
    b.add_argument("--dir", type=Path, default=Path("var/labels"), help="batch log directory (<data_dir>/labels)")
    b.set_defaults(func=_batch)


def _read(arg: str) -> str:
    if arg == "-" or arg == "@-":
        return sys.stdin.read()
    if arg.startswith("@"):
        return Path(arg[1:]).read_text(encoding="utf-8")
    return arg


def _verify(args: argparse.Namespace) -> int:
    from xcstack.safety.label import verify

    try:
        fields = verify(_read(args.label), args.public_key.read_bytes(), args.batch_log)
    except (ValueError, KeyError, OSError) as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"valid": True, **fields}, ensure_ascii=False))
    return 0


def _batch(args: argparse.Namespace) -> int:
    from xcstack.safety.label import find_batch

    rec = find_batch(args.dir, args.batch)
    if rec is None:
        print(f"no batch {args.batch} in {args.dir}", file=sys.stderr)
        return 1
    print(json.dumps(rec, ensure_ascii=False))
    return 0
