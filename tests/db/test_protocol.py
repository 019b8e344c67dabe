"""Rows become JSON: exact decimals, base64 bytes, ISO dates, no column lost to a repeated name."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

from xcstack.db.database import QueryResult
from xcstack.db.protocol import dumps, unique_columns
from xcstack.db.routes import result_body


def test_unique_columns() -> None:
    cols = unique_columns(["id", "name", "id", "id", "id_2"])
    assert cols[:4] == ["id", "name", "id_2", "id_3"] and len(set(cols)) == 5


def test_values_encode() -> None:
    u = uuid.uuid4()
    r = QueryResult(["d", "b", "t", "u", "td", "n"], [(Decimal("12345678901234567890.12"), b"\x00\xff",
                                                        dt.datetime(2026, 1, 2, 3, 4, 5), u, dt.timedelta(seconds=90),
                                                        None)], 1)
    body = json.loads(dumps(result_body("db", "q", r)))
    assert body["rows"] == [{"d": "12345678901234567890.12", "b": "AP8=", "t": "2026-01-02T03:04:05",
                             "u": str(u), "td": 90.0, "n": None}]
    assert json.loads(dumps(result_body("db", "q", QueryResult(None, [], 3)))) == {
        "database": "db", "query": "q", "rowcount": 3}
