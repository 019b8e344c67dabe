"""The db package's shape (issue 14 item 4): pool, database and bridge modules, one module per dialect.

Read from the source with `ast`, so the checks see every import, also the ones inside functions: no
private name imported from another module, no import cycle inside `xcstack.db`, and the profile
registry loads no database driver (each dialect imports its driver on first use only).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import xcstack.db

DB = Path(xcstack.db.__file__).parent
DRIVERS = ("psycopg", "pymysql", "MySQLdb", "dmPython", "ksycopg2", "DbtPyDbi", "DbtPy")


def _module(path: Path) -> str:
    parts = path.relative_to(DB.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from xcstack.db... import names` and `import xcstack.db...` in the file."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xcstack.db"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("xcstack.db"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in DB.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imports(path):
            # `from xcstack.db import errors` names a module; `from xcstack.db.pool import Job` names a module too
            for dep in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]:
                if dep in modules and dep != name:
                    graph[name].add(dep)
    return graph


def test_no_private_name_is_imported_across_db_modules() -> None:
    crossing = [
        f"{_module(path)}: from {target} import {n}"
        for path in DB.rglob("*.py")
        for target, names in _imports(path)
        for n in names
        if n.startswith("_")
    ]
    assert crossing == []


def test_no_import_cycle_inside_db() -> None:
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
    # the split's seams: the facade over databases over pools, each dialect over the shared base
    assert "xcstack.db.database" in graph["xcstack.db.bridge"]
    assert "xcstack.db.pool" in graph["xcstack.db.database"]
    assert "xcstack.db.profiles.base" in graph["xcstack.db.profiles.postgres"]


def test_the_profile_registry_imports_no_driver() -> None:
    code = (
        "import sys; from xcstack.db.profiles import PROFILES, get_profile; "
        "[get_profile(n) for n in PROFILES]; "
        f"print(','.join(m for m in {DRIVERS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
