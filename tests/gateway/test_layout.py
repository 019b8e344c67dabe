"""The gateway package's shape (issue 14 items 2 and 4): modules of one idea each, read with `ast`
so every import counts, also those inside functions.

The SSE parser free of I/O, and the watchdog's state changed only through its methods. Private names
and import cycles (the job stores were one) are checked for the whole source in
tests/core/test_import_cycles.py.
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


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file (all modules, not only the gateway's)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


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
