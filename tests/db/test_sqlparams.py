"""`:name` placeholders become the driver's paramstyle; literals, comments and casts are left alone."""

from __future__ import annotations

import pytest

from xcstack.db.sqlparams import SQLTemplateError, compile_sql


def test_styles() -> None:
    sql = "SELECT * FROM t WHERE a = :a AND b = :b OR a2 = :a"
    q = compile_sql(sql, "qmark")
    assert q.sql == "SELECT * FROM t WHERE a = ? AND b = ? OR a2 = ?"
    assert q.bind({"a": 1, "b": 2}) == (1, 2, 1)
    p = compile_sql(sql, "pyformat")
    assert p.sql == "SELECT * FROM t WHERE a = %(a)s AND b = %(b)s OR a2 = %(a)s"
    assert p.bind({"a": 1, "b": 2, "unused": 3}) == {"a": 1, "b": 2}
    n = compile_sql(sql, "numeric")
    assert n.sql == "SELECT * FROM t WHERE a = :1 AND b = :2 OR a2 = :1"
    assert n.bind({"a": 1, "b": 2}) == (1, 2)
    d = compile_sql(sql, "dollar")
    assert d.sql.endswith("a2 = $1")


def test_literals_comments_and_casts_are_not_placeholders() -> None:
    sql = (
        "SELECT ':x', \"col:y\", $$ :z $$, $tag$ it's :w $tag$, E'\\' :v', x::int, :real -- :c\n"
        "/* :d */ FROM t"
    )
    q = compile_sql(sql, "qmark")
    assert q.order == ("real",)
    assert "':x'" in q.sql and "x::int" in q.sql and "-- :c" in q.sql and "/* :d */" in q.sql


def test_percent_is_escaped_for_format_styles_only() -> None:
    q = compile_sql("SELECT '100%' , a LIKE :p", "pyformat")
    assert q.sql == "SELECT '100%%' , a LIKE %(p)s"
    assert compile_sql("SELECT '100%' , :p", "qmark").sql == "SELECT '100%' , ?"
    assert compile_sql("SELECT 1", "pyformat").bind({}) == {}


def test_mysql_backslash_escapes() -> None:
    q = compile_sql("SELECT 'it\\'s :no', \"a\\\" :no2\", :yes", "pyformat", backslash_escapes=True)
    assert q.order == ("yes",)
    # without MySQL mode the same backslash ends the literal early: a different reading, not an error
    assert compile_sql("SELECT 'a\\' , :x", "qmark").order == ("x",)


@pytest.mark.parametrize("bad", ["SELECT 'open", "SELECT $$ open", "SELECT /* open", 'SELECT "open'])
def test_unterminated(bad: str) -> None:
    with pytest.raises(SQLTemplateError):
        compile_sql(bad, "qmark")
