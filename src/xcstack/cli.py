"""The `xcstack` command. Core verbs live here; each capability adds its own through
`xcstack.<cap>.cli.register(subparsers)` (its `cli` in `capability.REGISTRY`, the table the app
and the supervisor read too).

The CLI modules are light: they build argparse parsers from the stdlib and config only, and import
their capability inside the command that needs it. So one optional native package that is missing
or broken (gmssl_pyx, onnxruntime, pymilvus, ...) costs only the commands that use it: `xcstack
doctor`, whose job is to report exactly that, always runs.

Exit status: a command's own, 2 for a configuration error, 3 when a package the command needs does
not import (the message names it, why, and the fix).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from xcstack.capability import CLI_MODULES  # modules exposing `register(subparsers) -> None`
from xcstack.config import ConfigError, load_settings, masked_dump


def _config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(json.dumps(masked_dump(settings), indent=2, ensure_ascii=False))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from xcstack.supervisor import serve

    settings = load_settings(args.config)
    if args.config:  # workers load the same file
        os.environ["XC_CONFIG"] = str(Path(args.config).resolve())
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xcstack", description="AI service gateway for 信创 infrastructure")
    parser.add_argument("--config", "-c", default=None, help="TOML config file (default: $XC_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the supervisor, http workers and side processes")
    p.set_defaults(func=_serve)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective config, secrets masked")
    show.set_defaults(func=_config_show)

    for name in CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a CLI module must stay light; never let one take the others down
            print(f"xcstack: the commands of {name} are unavailable: {exc}", file=sys.stderr)
            continue
        module.register(sub)
    _config_everywhere(parser)
    return parser


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """`xcstack serve --config F` works as `xcstack --config F serve` does: every subcommand takes the option
    too (SUPPRESS: when it is not given there, the global one stands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                if "--config" not in sub._option_string_actions:
                    sub.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
                _config_everywhere(sub)


def _import_failure(command: str, exc: ImportError) -> str:
    """What a command that could not import its capability tells the operator."""
    from xcstack.platform.native import FIXES, fix_for

    missing = (exc.name or "").split(".")[0]
    dist = next((d for d in FIXES if d.replace("-", "_").lower() == missing.lower()), missing)
    fix = f"; fix: {fix_for(dist)}" if missing else ""
    return (f"xcstack {command}: a package this command needs does not import ({type(exc).__name__}: {exc}){fix}. "
            "`xcstack doctor` checks every native package.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"xcstack: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(_import_failure(str(args.command), exc), file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
