"""`xcstack doctor`: print the platform probe and the tuning plan, and what does not work here.

xcstack doctor                 readable table (probe + plan + build flags + warnings)
xcstack doctor --json          the same as JSON
xcstack doctor --root DIR      probe a file tree (proc/, sys/, etc/ under DIR) instead of this machine
xcstack doctor --sysctl        recommended kernel settings as a sysctl.d file body

Every native package is imported in a child process (a crash or a hang is reported, not suffered);
each missing or broken one is listed with the reason and the fix. Exit status 0 when the report was
made (problems are in it), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _doctor(args: argparse.Namespace) -> int:
    from xcstack.config import load_settings
    from xcstack.platform.doctor import collect, render_text
    from xcstack.platform.planning.overrides import PlanOverrides
    from xcstack.platform.probe import probe
    from xcstack.platform.sysctl import render_sysctl

    root = Path(args.root) if args.root else Path("/")
    if args.root and not root.is_dir():
        print(f"xcstack doctor: --root {args.root}: not a directory", file=sys.stderr)
        return 2
    if args.sysctl:
        report = probe(root, machine=args.machine, python=False)
        sys.stdout.write(render_sysctl(report))
        return 0
    settings = load_settings(args.config)
    result = collect(root, PlanOverrides.from_settings(settings), machine=args.machine,
                     check_flags=not args.no_check_flags)  # fmt: skip
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        sys.stdout.write(render_text(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "doctor",
        help="probe the platform (cpu, os, kernel, io_uring, limits) and print the tuning plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--root", metavar="DIR", default=None, help="probe this file tree instead of the machine")
    p.add_argument("--machine", metavar="ARCH", default=None, help="architecture of the --root tree (inferred)")
    p.add_argument("--sysctl", action="store_true", help="print recommended kernel settings as a sysctl.d file")
    p.add_argument("--no-check-flags", action="store_true", help="do not try the build flags with the C compiler")
    p.set_defaults(func=_doctor)
