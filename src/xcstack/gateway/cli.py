"""`xcstack mock-upstream`: run the OpenAI-compatible test double (see gateway/mock_upstream.py).

Registration imports nothing but argparse (the mock needs Starlette, orjson, uvloop): see xcstack.cli."""

from __future__ import annotations

import argparse

# mock_upstream.FAULTS, repeated so that building the parser does not import the mock (a test keeps them equal)
FAULTS = ("", "500", "429", "reset", "reset_mid", "stall", "stall_headers")


def _mock_upstream(args: argparse.Namespace) -> int:
    from xcstack.gateway.mock_upstream import MockConfig, run

    cfg = MockConfig(
        ttft_s=args.ttft,
        tokens_per_s=args.tokens_per_s,
        token_bytes=args.token_bytes,
        tokens=args.tokens,
        fault=args.fault,
        fault_after=args.fault_after,
        fault_times=args.fault_times,
        embedding_dim=args.embedding_dim,
        api_key=args.api_key,
        models=args.models.split(",") if args.models else ["mock-model"],
        name=args.name,
    )
    if args.cpu is not None:
        import os

        os.sched_setaffinity(0, {args.cpu})
    print(f"mock-upstream (a test double, not a model server) on http://{args.host}:{args.port}/v1", flush=True)
    try:
        run(args.host, args.port, cfg, use_uvloop=not args.no_uvloop)
    except KeyboardInterrupt:
        pass
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "mock-upstream",
        help="run a vLLM-like OpenAI-compatible TEST DOUBLE (fake tokens, injected faults)",
        description="A test double of an OpenAI-compatible LLM server for tests and benchmarks: "
        "fake tokens at a configurable rate, usage, disconnect recording, injected faults. Not a model server.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--tokens-per-s", type=float, default=0.0, help="generation rate; 0 = as fast as the client reads")
    p.add_argument("--token-bytes", type=int, default=4, help="bytes of text per token")
    p.add_argument("--tokens", type=int, default=16, help="completion length when max_tokens is not given")
    p.add_argument("--fault", choices=FAULTS, default="", help="inject this fault")
    p.add_argument("--fault-after", type=int, default=0, help="chunks before reset_mid/stall")
    p.add_argument("--fault-times", type=int, default=-1, help="requests that get the fault (-1: all)")
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--api-key", default="", help="require this bearer token")
    p.add_argument("--models", default="", help="comma-separated model names (default mock-model)")
    p.add_argument("--name", default="mock")
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--no-uvloop", action="store_true")
    p.set_defaults(func=_mock_upstream)


def main(argv: list[str] | None = None) -> int:
    """`python -m xcstack.gateway.cli mock-upstream ...` (without loading every capability's CLI)."""
    parser = argparse.ArgumentParser(prog="xcstack")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    import sys

    sys.exit(main())
