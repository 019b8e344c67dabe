"""Who may import what of the crypto package: outside `xcstack.crypto`, only the recipes and the SM2 key API.

The primitive modules (SM3/SM4 modes, DER codecs, curve parameters, SM2 backends) stay replaceable
because nothing else depends on them; `xcstack.crypto.sm` is the tests' namespace, never used by src/.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "xcstack"
PRIMITIVES = "xcstack.crypto.primitives"
ALLOWED_OUTSIDE = {"xcstack.crypto.recipes", "xcstack.crypto.primitives.sm2"}


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]  # `from xcstack.crypto import sm`
    return out


def test_src_never_imports_the_test_namespace_or_primitives_from_outside() -> None:
    bad: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        inside = path.is_relative_to(SRC / "crypto")
        for name in _imports(path):
            if name == "xcstack.crypto.sm":
                bad.append(f"{path.relative_to(SRC)}: {name}")
            elif not inside and name.startswith(PRIMITIVES) and name != PRIMITIVES:
                if not any(name == a or name.startswith(a + ".") for a in ALLOWED_OUTSIDE):
                    bad.append(f"{path.relative_to(SRC)}: {name}")
    assert bad == []


def test_no_python_curve_arithmetic_in_crypto() -> None:
    """Secret scalars are multiplied only in the native backends: no modular inverse on the SM2 field
    (the tell-tale of hand-written point arithmetic) anywhere in the crypto package."""
    hits = []
    for path in sorted((SRC / "crypto").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pow"
                and len(node.args) == 3 and isinstance(node.args[1], ast.UnaryOp)
            ):
                hits.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert hits == []
