"""Rewrite `:name` placeholders into a driver's paramstyle, once, at start-up.

Named queries are written with `:name` whatever the database. This scanner skips string literals
('...' with '' escapes, E'...' with backslash escapes, $tag$...$tag$), quoted identifiers ("..."
and `...`), comments (-- and /* */) and PostgreSQL casts (`::type`), so only real placeholders are
replaced. Values are always bound by the driver: a parameter can never become SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

Paramstyle = Literal["qmark", "numeric", "named", "format", "pyformat", "dollar"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


class SQLTemplateError(ValueError):
    """The SQL of a named query cannot be compiled (unterminated literal, unknown parameter)."""


@dataclass(frozen=True)
class CompiledSQL:
    """SQL in the driver's paramstyle and how to turn a params dict into the driver's argument."""

    sql: str
    style: Paramstyle
    order: tuple[str, ...]  # names in placeholder order (positional styles)
    names: frozenset[str]  # every name used

    def bind(self, params: dict[str, Any]) -> Any:
        if self.style in ("qmark", "format", "numeric", "dollar"):
            return tuple(params[n] for n in self.order)
        if not self.names:
            return {}  # not None: drivers then still unescape %% in the SQL
        return {n: params[n] for n in self.names}


def compile_sql(sql: str, style: Paramstyle, *, backslash_escapes: bool = False) -> CompiledSQL:
    """`backslash_escapes`: MySQL dialect, where '...' and "..." literals honour backslash escapes."""
    out: list[str] = []
    order: list[str] = []
    index: dict[str, int] = {}
    i, n = 0, len(sql)
    percent_escape = style in ("format", "pyformat")
    while i < n:
        c = sql[i]
        if c == "'" or ((c in "eE") and i + 1 < n and sql[i + 1] == "'" and not _word_before(sql, i)):
            j = _skip_quoted(sql, i + 1 if c != "'" else i, "'", backslash=c != "'" or backslash_escapes)
            out.append(_esc(sql[i:j], percent_escape))
            i = j
        elif c == '"' or c == "`":
            j = _skip_quoted(sql, i, c, backslash=backslash_escapes and c == '"')
            out.append(_esc(sql[i:j], percent_escape))
            i = j
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(_esc(sql[i:j], percent_escape))
            i = j
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise SQLTemplateError("unterminated /* comment")
            out.append(_esc(sql[i : j + 2], percent_escape))
            i = j + 2
        elif c == "$" and (m := _DOLLAR_TAG.match(sql, i)) and not _word_before(sql, i):
            tag = m.group(0)
            j = sql.find(tag, m.end())
            if j < 0:
                raise SQLTemplateError(f"unterminated {tag} literal")
            out.append(_esc(sql[i : j + len(tag)], percent_escape))
            i = j + len(tag)
        elif c == ":" and sql.startswith("::", i):
            out.append("::")
            i += 2
        elif c == ":" and (m := _IDENT.match(sql, i + 1)) and not (i > 0 and sql[i - 1] == ":"):
            name = m.group(0)
            out.append(_placeholder(style, name, order, index))
            i = m.end()
        elif c == "%" and percent_escape:
            out.append("%%")
            i += 1
        else:
            out.append(c)
            i += 1
    return CompiledSQL("".join(out), style, tuple(order), frozenset(order))


def _word_before(sql: str, i: int) -> bool:
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")


def _skip_quoted(sql: str, start: int, quote: str, *, backslash: bool) -> int:
    """Index just past the literal that opens at sql[start] == quote."""
    i, n = start + 1, len(sql)
    while i < n:
        c = sql[i]
        if backslash and c == "\\":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and sql[i + 1] == quote:  # doubled quote: escaped
                i += 2
                continue
            return i + 1
        i += 1
    raise SQLTemplateError(f"unterminated {quote} literal")


def _esc(text: str, percent_escape: bool) -> str:
    return text.replace("%", "%%") if percent_escape else text


def _placeholder(style: Paramstyle, name: str, order: list[str], index: dict[str, int]) -> str:
    if style == "qmark":
        order.append(name)
        return "?"
    if style == "format":
        order.append(name)
        return "%s"
    if style in ("numeric", "dollar"):
        if name not in index:
            order.append(name)
            index[name] = len(order)
        return f"{':' if style == 'numeric' else '$'}{index[name]}"
    if name not in index:
        order.append(name)
        index[name] = len(order)
    if style == "pyformat":
        return f"%({name})s"
    return f":{name}"
