"""No import cycle between the modules of `src/xcstack` (issue 14 item 2).

Every import counts, wherever it is written: at module level, inside a function (a lazy import), under
`if TYPE_CHECKING:`. A cycle hidden behind a lazy or type-only import still ties two modules into one
unit that cannot be understood, tested or split alone; adapters take the services they use instead.
`from pkg import name` depends on `pkg` (its `__init__` runs) and on `pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Edges (importer, imported) of a cycle still to remove; each must exist (a stale entry fails), and only
# such an edge is ignored, so any other cycle fails. None is left.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((SRC / "xcstack").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    origin = node.module or ""
                targets = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_closed_path(min(component), component, graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _closed_path(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest way from `start` back to itself inside its component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:  # v -> start closes it: walk back from v
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycle_in_xcstack() -> None:
    graph = import_graph()
    for importer, imported in ALLOWED:
        assert imported in graph.get(importer, set()), f"allowed edge {importer} -> {imported} is gone: drop it"
        graph[importer].discard(imported)
    found = cycles(graph)
    assert not found, "import cycles (imports at any level count, TYPE_CHECKING ones too):\n" + "\n".join(
        " -> ".join(c) for c in found)


def test_the_walk_sees_lazy_and_type_checking_imports() -> None:
    """The walk is what the rule rests on: a function-level and a TYPE_CHECKING import are edges."""
    graph = import_graph()
    assert "xcstack.inference.routes" in graph["xcstack.inference.capability"]  # inside routes()
    assert "xcstack.security.service" in graph["xcstack.security.routes"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_private_name_is_imported_across_modules() -> None:
    """A module's `_names` are its own: what another module needs is public (issue 14 item 2)."""
    crossing = []
    for path in sorted((SRC / "xcstack").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xcstack"):
                crossing += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []
