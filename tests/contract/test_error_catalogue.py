"""The error catalogue (issue 14 item 5): every error code is a member of one `StrEnum` of
`ERROR_CATALOGUE`, every raise site uses the member, and the docs' error tables agree with the enums
both ways, so a client reading docs/ knows every code it can get and no documented code is stale."""

from __future__ import annotations

import ast
import re
from enum import StrEnum
from pathlib import Path

from xcstack.openapi import ERROR_CATALOGUE, error_codes

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "xcstack"


def documented_codes() -> dict[str, set[str]]:
    """code -> the docs files whose error tables (rows `| 404 | `code` ... | when |`) list it. `4xx` is any
    4xx; `-` marks a code carried in a body that is no error response (a job's error, a stream's tail)."""
    found: dict[str, set[str]] = {}
    for md in sorted(DOCS.glob("*.md")):
        for line in md.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and re.fullmatch(r"[45](?:\d\d|xx)|-", cells[0]):
                codes = set(re.findall(r"`([a-z][a-z0-9_]+)`", cells[1]))
                codes |= set(re.findall(r"[45]\d\d `([a-z][a-z0-9_]+)`", line))
                for code in codes:
                    found.setdefault(code, set()).add(md.name)
    return found


def catalogue() -> dict[str, list[str]]:
    """code -> the enums that hold it (`Enum.MEMBER`)."""
    out: dict[str, list[str]] = {}
    for enum in ERROR_CATALOGUE:
        for member in enum:
            out.setdefault(member.value, []).append(f"{enum.__name__}.{member.name}")
    return out


def test_catalogue_is_one_enum_per_capability_and_each_code_has_one_home() -> None:
    assert all(issubclass(e, StrEnum) for e in ERROR_CATALOGUE)
    names = {e.__module__ for e in ERROR_CATALOGUE}
    assert names == {"xcstack.errors", *(f"xcstack.{cap}.protocol" for cap in
                                         ("gateway", "inference", "vector", "db", "crypto", "security",
                                                                             "usage"))}
    twice = {code: homes for code, homes in catalogue().items() if len(homes) > 1}
    assert twice == {}, "a code shared by capabilities belongs in CoreCode (errors.py), once"
    assert set(error_codes()) == set(catalogue()), "the OpenAPI Error.code enum is exactly the catalogue"


def test_every_documented_code_is_in_the_catalogue() -> None:
    documented = documented_codes()
    assert len(documented) > 100  # the tables were found
    unknown = {code: sorted(files) for code, files in documented.items() if code not in catalogue()}
    assert unknown == {}, "codes in a docs/ error table that no enum holds (stale or misspelled)"


def test_every_catalogue_code_is_documented_in_an_error_table() -> None:
    documented = documented_codes()
    missing = sorted(f"{homes[0]} ({code})" for code, homes in catalogue().items() if code not in documented)
    assert missing == [], "enum members no docs/*.md error table lists: add a `| status | `code` | when |` row"


def literal_codes(tree: ast.AST) -> list[tuple[int, str]]:
    """`code="x"` arguments, `code = "x"` class attributes and `{"code": "x"}` bodies: codes that bypass the enums."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "code":
            value: ast.AST | None = node.value
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
                    stmt, ast.AnnAssign) else []
                if [t.id for t in targets if isinstance(t, ast.Name)] == ["code"]:
                    assert isinstance(stmt, ast.Assign | ast.AnnAssign)
                    if isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                        found.append((stmt.lineno, stmt.value.value))
            continue
        elif isinstance(node, ast.Dict):
            value = next((v for k, v in zip(node.keys, node.values, strict=True)
                          if isinstance(k, ast.Constant) and k.value == "code"), None)
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.append((value.lineno, value.value))
    return found


def test_no_error_code_is_a_literal_in_the_source() -> None:
    literals = [f"{path.relative_to(SRC)}:{line} {code!r}" for path in sorted(SRC.rglob("*.py"))
                for line, code in literal_codes(ast.parse(path.read_text(encoding="utf-8")))]
    assert literals == [], "raise with a catalogue member (CoreCode or the capability's protocol enum), not a literal"


def test_the_literal_check_sees_each_form() -> None:
    tree = ast.parse('class E(X):\n    code = "a"\nraise X("m", code="b")\nbody = {"code": "c"}\nok = X(code=C.D)\n')
    assert sorted(code for _, code in literal_codes(tree)) == ["a", "b", "c"]


def test_every_worker_failure_answers_a_catalogue_code() -> None:
    """A model worker's IPC code never reaches a client as is: client.http_error maps each one."""
    from xcstack.inference.batcher import WorkerCode
    from xcstack.inference.client import http_error

    codes = set(error_codes())
    for code in WorkerCode:
        for retriable in (False, True):
            assert http_error(code.value, "m", retriable).code in codes, (code, retriable)
    assert http_error("busy", "m", True).code == "worker_busy" and http_error("queue_full", "m", True).status == 503
