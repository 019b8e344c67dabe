"""`xcstack model ...`: import models into the model repository and list it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xcstack.config import load_settings


def _repo(args: argparse.Namespace) -> Path:
    if getattr(args, "repository", None):
        return Path(args.repository)
    settings = load_settings(args.config)
    return settings.inference.repository_dir(settings.data_dir)


def _import(args: argparse.Namespace) -> int:
    if args.gguf:  # a chat model for the llm capability's llama.cpp worker
        from xcstack.llm.cli import import_gguf_command

        return import_gguf_command(args)
    if not args.source:
        print("xcstack model import: SOURCE (a checkpoint folder) or --gguf FILE is required", file=sys.stderr)
        return 2
    from xcstack.inference.export import ModelImportError, import_model

    repo = _repo(args)
    name = args.name or Path(args.source).resolve().name.lower()
    int8 = args.int8_name or (f"{name}-int8" if args.int8 else None)
    try:
        written = import_model(Path(args.source), repo, name, int8_name=int8, fp32=not args.int8_only,
                               force=args.force)
    except ModelImportError as exc:
        print(f"xcstack model import: {exc}", file=sys.stderr)
        return 1
    for p in written:
        print(f"imported {p}")
    return 0


def _import_default(args: argparse.Namespace) -> int:
    from xcstack.inference.export import ModelImportError, import_default

    repo = _repo(args)
    try:
        written = import_default(repo, if_missing=args.if_missing, force=args.force)
    except ModelImportError as exc:
        print(f"xcstack model import-default: {exc}", file=sys.stderr)
        return 1
    if not written:
        print(f"default model already in {repo}")
    for p in written:
        print(f"imported {p}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from xcstack.inference.repository import ModelRepository

    repo = ModelRepository(_repo(args)).scan()
    print(json.dumps(repo.index(), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("model", help="local models: import into the model repository, list")
    sub = p.add_subparsers(dest="model_command", required=True)

    imp = sub.add_parser("import", help="build ONNX from a BERT-family safetensors checkpoint (no torch)")
    imp.add_argument("source", nargs="?", help="directory with config.json, *.safetensors, tokenizer.json")
    imp.add_argument("--gguf", metavar="FILE", help="a GGUF chat model for the llama.cpp worker: header and "
                     "completeness checked, sha256 recorded, copied into the LLM repository ([llm] repository, "
                     "or --repository)")
    imp.add_argument("--name", help="model name in the repository (default: the folder name)")
    imp.add_argument("--int8", action="store_true", help="also write a per-channel int8 copy as <name>-int8")
    imp.add_argument("--int8-name", help="name of the int8 copy (implies --int8)")
    imp.add_argument("--int8-only", action="store_true", help="write only the int8 copy")
    imp.add_argument("--repository", help="model repository (default: [inference] model_repository)")
    imp.add_argument("--force", action="store_true", help="replace models that exist")
    imp.set_defaults(func=_import)

    dft = sub.add_parser("import-default", help="import the bundled all-MiniLM-L6-v2 (fp32 + int8)")
    dft.add_argument("--if-missing", action="store_true", help="do nothing when it is already imported")
    dft.add_argument("--repository", help="model repository (default: [inference] model_repository)")
    dft.add_argument("--force", action="store_true", help="re-import even if present")
    dft.set_defaults(func=_import_default)

    ls = sub.add_parser("list", help="models in the repository and their state")
    ls.add_argument("--repository", help="model repository (default: [inference] model_repository)")
    ls.set_defaults(func=_list)
