"""The safe filter language: parsing, error messages, and SQL in which client text is only ever a parameter."""

from __future__ import annotations

import pytest

from xcstack.vector.filters import MAX_DEPTH, Cmp, parse_filter, to_sql
from xcstack.vector.store import InvalidFilter


def test_parses_the_milvus_subset() -> None:
    node = parse_filter('cat == "a" && (n >= 3 || tag in ["x", \'y\']) and not id like "r1%"')
    sql, params = to_sql(node)
    assert sql.count("%s") == len(params)
    assert "cat" not in sql and "'a'" not in sql  # names and literals are parameters
    assert parse_filter("flag == true") == Cmp("flag", "==", True)
    assert parse_filter("x not in [1, 2.5, -3e2]") == Cmp("x", "nin", (1, 2.5, -300.0))
    assert parse_filter('s == "a\\"b"') == Cmp("s", "==", 'a"b')


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty expression"),
        ("cat === 'a'", "unexpected character '=' at column 7"),
        ("n >", "expected a literal"),
        ("n > 1 and", "expected a field name"),
        ("(n > 1", "expected ')'"),
        ("n ~ 1", "unexpected character '~'"),
        ("x in [1, 2", "expected ']'"),
        ("x like 3", "needs a string pattern"),
        ("1 == x", "expected a field name"),
        ("x == y", "expected a literal"),
        ("s == 'a\\q'", "unknown escape"),
        ("n > 1 n < 2", "unexpected 'n'"),
    ],
)
def test_errors_carry_the_parser_message(expr: str, message: str) -> None:
    with pytest.raises(InvalidFilter) as info:
        parse_filter(expr)
    assert message in info.value.message
    assert info.value.status == 400 and info.value.code == "invalid_filter"


def test_limits() -> None:
    with pytest.raises(InvalidFilter, match="nested deeper"):
        parse_filter("(" * (MAX_DEPTH + 5) + "a == 1" + ")" * (MAX_DEPTH + 5))
    with pytest.raises(InvalidFilter, match="longer than"):
        parse_filter("a == 1 or " * 1000 + "a == 2")
    with pytest.raises(InvalidFilter, match="longer than 1024"):
        parse_filter("a in [" + ", ".join("1" for _ in range(1100)) + "]")


def test_injection_attempts_stay_parameters() -> None:
    evil = "x'); DROP TABLE users; --"
    sql, params = to_sql(parse_filter(f'name == "{evil}"'))
    assert "DROP" not in sql
    assert any(getattr(p, "obj", None) == evil for p in params)
    with pytest.raises(InvalidFilter):
        parse_filter("name == 'a'; DROP TABLE users")


def test_id_needs_strings() -> None:
    with pytest.raises(InvalidFilter, match="string"):
        to_sql(parse_filter("id == 3"))
