"""The gateway package's shape (issue 14 items 2 and 4): modules of one idea each, read with `ast`
so every import counts, also those inside functions.

No private name imported from another module, no import cycle inside `xcstack.gateway` (the job
stores were one: jobstore <-> jobstore_redis), the SSE parser free of I/O, and the watchdog's state
changed only through its methods.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

import xcstack.gateway
from xcstack.gateway.watchdog import Watchdog

GATEWAY = Path(xcstack.gateway.__file__).parent
PREFIX = "xcstack.gateway"


def _module(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file (all modules, not only the gateway's)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in GATEWAY.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imports(path):
            # `from xcstack.gateway import metrics` names a module, `from xcstack.gateway.sse import DONE` a name
            for dep in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]:
                if dep in modules and dep != name:
                    graph[name].add(dep)
    return graph


def test_no_private_name_is_imported_from_a_gateway_module() -> None:
    crossing = [
        f"{_module(path)}: from {target} import {n}"
        for path in GATEWAY.rglob("*.py")
        for target, names in _imports(path)
        if target.startswith(PREFIX)
        for n in names
        if n.startswith("_")
    ]
    assert crossing == []


def test_no_import_cycle_inside_the_gateway() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
    # the seams of the split: the service over failover, relay and accounting; the relay over the parser;
    # each job store over the protocol, the Redis one imported only where it is chosen
    assert {f"{PREFIX}.failover", f"{PREFIX}.relay", f"{PREFIX}.accounting", f"{PREFIX}.local"} <= graph[
        f"{PREFIX}.service"]
    assert f"{PREFIX}.sse" in graph[f"{PREFIX}.relay"]
    assert graph[f"{PREFIX}.jobstore.redis"] & {f"{PREFIX}.jobstore", f"{PREFIX}.jobstore.sql"} == set()
    assert f"{PREFIX}.jobstore.base" in graph[f"{PREFIX}.jobstore.redis"]
    assert f"{PREFIX}.jobstore.base" in graph[f"{PREFIX}.jobstore.sql"]


def test_the_sse_parser_does_no_io() -> None:
    imported = {target.split(".")[0] if not target.startswith("xcstack") else target
                for target, _ in _imports(GATEWAY / "sse.py")}
    assert imported <= {"__future__", "typing", "xcstack.httputil"}


def test_no_module_writes_watchdog_fields() -> None:
    """Outside watchdog.py nothing assigns an attribute of a watchdog (`wd.<field> = ...`)."""
    writes = [
        f"{path.name}:{node.lineno}"
        for path in GATEWAY.rglob("*.py")
        if path.name != "watchdog.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "wd"
    ]
    assert writes == []


async def test_watchdog_state_changes_only_through_its_methods() -> None:
    async def body() -> tuple[str | None, bool]:
        wd = Watchdog()
        for field in ("reason", "armed", "busy"):
            with pytest.raises(AttributeError):
                setattr(wd, field, None)
        wd.set_phase(0.02, "idle")
        wd.relaying()  # relaying to a slow client: the idle deadline waits
        await asyncio.sleep(0.06)
        assert wd.reason is None
        wd.waiting_upstream()  # waiting for the upstream again: the idle gap runs
        reason = None
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            reason = wd.take()
        await wd.close()
        sending = Watchdog()
        sending.disarm()  # the answer is decided: a late disconnect must not cancel its sending
        sending.fire("disconnect")
        await asyncio.sleep(0.01)  # raises CancelledError if the disconnect got through
        await sending.close()
        return reason, sending.reason is None

    assert await asyncio.create_task(body()) == ("idle", True)
