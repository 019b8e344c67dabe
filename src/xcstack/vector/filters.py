"""A small, safe filter language (a subset of Milvus boolean expressions) and its SQL translation.

Grammar (keywords are case-insensitive; `&&`, `||`, `!` are accepted too):

    expr    := or
    or      := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | "(" expr ")" | cmp
    cmp     := field ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
             | field ["not"] "in" "[" literal ("," literal)* "]"
             | field "like" string
    field   := identifier            (`id` is the row id; anything else is a payload key)
    literal := string | number | true | false

The same expression works on Milvus (where payload keys are dynamic fields). For PostgreSQL it
compiles to SQL in which every field name and literal is a bind parameter: client text never
becomes SQL. A type mismatch (comparing a string field with a number) is false, as in Milvus.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from xcstack.vector.protocol import MAX_FILTER_CHARS
from xcstack.vector.store import FilterTooDeep, InvalidFilter

MAX_DEPTH = 32
MAX_IN_ITEMS = 1024

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|<=|>=|&&|\|\||<|>|!|\(|\)|\[|\]|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.X,
)
_KEYWORDS = {"and", "or", "not", "in", "like", "true", "false"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


@dataclass(frozen=True)
class Tok:
    kind: str  # num, str, op, name, kw, end
    value: Any
    pos: int


@dataclass(frozen=True)
class Cmp:
    field: str
    op: str  # == != < <= > >= in nin like
    value: Any  # scalar, or a tuple for in / nin


@dataclass(frozen=True)
class BoolOp:
    op: str  # and / or
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


Node = Cmp | BoolOp | Not


def _unescape(raw: str, pos: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            nxt = raw[i + 1] if i + 1 < len(raw) else ""
            if nxt not in _ESCAPES:
                raise InvalidFilter(f"unknown escape '\\{nxt}' in string at column {pos + i + 1}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise InvalidFilter(f"unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        raw = m.group()
        if kind == "num":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
            if (isinstance(value, float) and not math.isfinite(value)) or (isinstance(value, int) and not (
                    -(2**63) <= value < 2**63)):  # 1e400 became inf and failed in the engine (a 500)
                raise InvalidFilter(f"number {raw[:32]!r} at column {pos + 1} is out of range")
            toks.append(Tok("num", value, pos))
        elif kind == "str":
            toks.append(Tok("str", _unescape(raw[1:-1], pos + 1), pos))
        elif kind == "op":
            toks.append(Tok("op", {"&&": "and", "||": "or", "!": "not"}.get(raw, raw), pos))
        elif kind == "name":
            low = raw.lower()
            toks.append(Tok("kw", low, pos) if low in _KEYWORDS else Tok("name", raw, pos))
        pos = m.end()
    toks.append(Tok("end", None, len(text)))
    return toks


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at(self, *values: str) -> bool:
        tok = self.peek()
        return tok.kind in ("op", "kw") and tok.value in values

    def expect(self, value: str) -> None:
        tok = self.take()
        if tok.kind not in ("op", "kw") or tok.value != value:
            raise InvalidFilter(f"expected {value!r} at column {tok.pos + 1}, found {_show(tok)}")

    def parse(self) -> Node:
        node = self.or_()
        tok = self.peek()
        if tok.kind != "end":
            raise InvalidFilter(f"unexpected {_show(tok)} at column {tok.pos + 1}")
        return node

    def or_(self) -> Node:
        items = [self.and_()]
        while self.at("or"):
            self.take()
            items.append(self.and_())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def and_(self) -> Node:
        items = [self.unary()]
        while self.at("and"):
            self.take()
            items.append(self.unary())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def unary(self) -> Node:
        if not self.at("not", "("):
            return self.cmp()
        self.depth += 1  # each `not` and `(` is one level
        if self.depth > MAX_DEPTH:
            raise FilterTooDeep(f"expression nested deeper than {MAX_DEPTH} levels")
        try:
            if self.take().value == "not":
                return Not(self.unary())
            node = self.or_()
            self.expect(")")
            return node
        finally:
            self.depth -= 1

    def literal(self) -> Any:
        tok = self.take()
        if tok.kind in ("num", "str"):
            return tok.value
        if tok.kind == "kw" and tok.value in ("true", "false"):
            return tok.value == "true"
        raise InvalidFilter(
            f"expected a literal (string, number, true, false) at column {tok.pos + 1}, found {_show(tok)}"
        )

    def cmp(self) -> Node:
        tok = self.take()
        if tok.kind != "name":
            raise InvalidFilter(f"expected a field name at column {tok.pos + 1}, found {_show(tok)}")
        field = tok.value
        op_tok = self.take()
        op = op_tok.value if op_tok.kind in ("op", "kw") else None
        if op in ("==", "!=", "<", "<=", ">", ">="):
            value = self.literal()
            return Cmp(field, op, value)
        if op == "not" and self.at("in"):
            self.take()
            return Cmp(field, "nin", self.in_list())
        if op == "in":
            return Cmp(field, "in", self.in_list())
        if op == "like":
            s = self.take()
            if s.kind != "str":
                raise InvalidFilter(f"'like' needs a string pattern at column {s.pos + 1}")
            return Cmp(field, "like", s.value)
        raise InvalidFilter(
            f"expected an operator (==, !=, <, <=, >, >=, in, not in, like) after {field!r} "
            f"at column {op_tok.pos + 1}, found {_show(op_tok)}"
        )

    def in_list(self) -> tuple[Any, ...]:
        self.expect("[")
        items: list[Any] = []
        if not self.at("]"):
            items.append(self.literal())
            while self.at(","):
                self.take()
                items.append(self.literal())
                if len(items) > MAX_IN_ITEMS:
                    raise InvalidFilter(f"'in' list longer than {MAX_IN_ITEMS} items")
        self.expect("]")
        return tuple(items)


def _show(tok: Tok) -> str:
    if tok.kind == "end":
        return "end of expression"
    if tok.kind == "str":
        return f"string {tok.value!r}"
    return repr(str(tok.value))


def check_filter(text: Any) -> str | None:
    """The checks every engine gets before a filter reaches it: a string of at most MAX_FILTER_CHARS,
    brackets and parentheses nested at most MAX_DEPTH deep (outside string literals). Milvus receives
    its full syntax as is, so this is a scan, not a parse; its recursive parser would overflow on deep
    nesting (a 500). Returns the filter, or None for none ("")."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise InvalidFilter("must be a string")
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidFilter(f"longer than {MAX_FILTER_CHARS} characters")
    depth = 0
    quote = ""
    escaped = False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise FilterTooDeep(f"brackets nested deeper than {MAX_DEPTH} levels (column {i + 1})")
        elif ch in ")]}" and depth:
            depth -= 1
    return text


def parse_filter(text: str) -> Node:
    """Parse a filter expression; `InvalidFilter` (400) with the parser's message if it is bad."""
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidFilter(f"longer than {MAX_FILTER_CHARS} characters")
    if not text.strip():
        raise InvalidFilter("empty expression")
    return _Parser(text).parse()


# ---- SQL translation (PostgreSQL, payload in a jsonb column) -----------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string"


def to_sql(node: Node, *, id_column: str = "id", payload_column: str = "payload") -> tuple[str, list[Any]]:
    """(SQL boolean expression with %s placeholders, parameters). Column names are trusted constants."""
    from psycopg.types.json import Jsonb  # the postgres extra; only the pgvector backend translates

    params: list[Any] = []

    def field_ref(name: str) -> str:
        params.append(name)
        return f"{payload_column}->%s"

    def emit(n: Node) -> str:
        if isinstance(n, BoolOp):
            return "(" + f" {n.op.upper()} ".join(emit(i) for i in n.items) + ")"
        if isinstance(n, Not):
            return f"(NOT COALESCE({emit(n.item)}, false))"
        if n.field == id_column:
            return emit_id(n)
        if n.op in ("in", "nin"):
            if not n.value:
                return "false" if n.op == "in" else "true"
            ref = field_ref(n.field)
            params.extend(Jsonb(v) for v in n.value)
            marks = ", ".join(["%s::jsonb"] * len(n.value))
            expr = f"COALESCE({ref} IN ({marks}), false)"
            return expr if n.op == "in" else f"(NOT {expr})"
        if n.op == "like":
            ref = field_ref(n.field)
            params.append(n.field)
            params.append(n.value)
            return f"(jsonb_typeof({ref}) = 'string' AND {payload_column}->>%s LIKE %s)"
        if n.op in ("==", "!="):
            ref = field_ref(n.field)
            params.append(Jsonb(n.value))
            sql_op = "=" if n.op == "==" else "<>"
            return f"COALESCE({ref} {sql_op} %s::jsonb, false)"
        # ordering: only between values of the same JSON type
        ref = field_ref(n.field)
        params.append(_json_type(n.value))
        params.append(n.field)
        params.append(Jsonb(n.value))
        return f"(jsonb_typeof({ref}) = %s AND {payload_column}->%s {n.op} %s::jsonb)"

    def emit_id(n: Cmp) -> str:
        values = n.value if isinstance(n.value, tuple) else (n.value,)
        if any(not isinstance(v, str) for v in values):
            raise InvalidFilter(f"'{id_column}' is a string; compare it with strings")
        if n.op in ("in", "nin"):
            if not values:
                return "false" if n.op == "in" else "true"
            params.append(list(values))
            return f"({id_column} = ANY(%s))" if n.op == "in" else f"(NOT ({id_column} = ANY(%s)))"
        params.append(n.value)
        if n.op == "like":
            return f"({id_column} LIKE %s)"
        sql_op = {"==": "=", "!=": "<>"}.get(n.op, n.op)
        return f"({id_column} {sql_op} %s)"

    return emit(node), params


def referenced_fields(node: Node) -> set[str]:
    if isinstance(node, Cmp):
        return {node.field}
    if isinstance(node, Not):
        return referenced_fields(node.item)
    out: set[str] = set()
    for item in node.items:
        out |= referenced_fields(item)
    return out
