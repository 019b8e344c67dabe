"""Driver profiles: paramstyle, error classification, cancel method, health query, DSN parsing.

DM8 and GBase 8s have no server here: their profiles are unit-tested (with the real dmPython
module where it is installed); integration tests run when XC_TEST_DM_DSN / XC_TEST_GBASE_DSN is set.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from xcstack.db.profiles import PROFILES, DriverMissing, ErrorKind, describe, get_profile

K = ErrorKind


def test_every_profile_is_described() -> None:
    rows = {r["driver"]: r for r in describe()}
    assert set(rows) == {"sqlite", "postgres", "kingbase", "mysql", "mysqlclient", "dm", "gbase8s"}
    assert rows["postgres"]["cancel"] == "protocol" and rows["mysql"]["cancel"] == "kill_query"
    assert rows["dm"]["paramstyle"] == "qmark" and rows["kingbase"]["paramstyle"] == "pyformat"
    for name in PROFILES:
        assert get_profile(name).health_query.upper().startswith("SELECT 1")


def test_unknown_driver() -> None:
    with pytest.raises(ValueError, match="unknown driver"):
        get_profile("oracle")


def test_sqlite_classification() -> None:
    p = get_profile("sqlite")
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    errors: dict[str, Exception] = {}
    for label, sql in {"dup": "INSERT INTO t VALUES (1)", "syntax": "SELEC 1", "table": "SELECT * FROM nope"}.items():
        try:
            conn.execute(sql)
        except sqlite3.Error as exc:
            errors[label] = exc
    assert p.classify(errors["dup"]) is K.CONSTRAINT
    assert p.classify(errors["syntax"]) is K.SYNTAX
    assert p.classify(errors["table"]) is K.SYNTAX
    assert p.classify(sqlite3.OperationalError("interrupted")) is K.TIMEOUT
    assert p.classify(sqlite3.OperationalError("database is locked")) is K.CONFLICT
    conn.close()
    try:
        conn.execute("SELECT 1")
    except sqlite3.Error as exc:
        assert p.classify(exc) is K.CONNECTION_LOST


def test_postgres_classification() -> None:
    psycopg = pytest.importorskip("psycopg")
    p = get_profile("postgres")
    assert p.classify(psycopg.errors.UniqueViolation()) is K.CONSTRAINT
    assert p.classify(psycopg.errors.SyntaxError()) is K.SYNTAX
    assert p.classify(psycopg.errors.UndefinedTable()) is K.SYNTAX
    assert p.classify(psycopg.errors.QueryCanceled()) is K.TIMEOUT
    assert p.classify(psycopg.errors.AdminShutdown()) is K.CONNECTION_LOST
    assert p.classify(psycopg.errors.InvalidTextRepresentation()) is K.DATA
    assert p.classify(psycopg.errors.DeadlockDetected()) is K.CONFLICT
    assert p.classify(psycopg.OperationalError("server closed the connection unexpectedly")) is K.CONNECTION_LOST
    assert p.classify(psycopg.InterfaceError("the connection is closed")) is K.CONNECTION_LOST


def test_kingbase_classification() -> None:
    ks = pytest.importorskip("ksycopg2")
    p = get_profile("kingbase")
    assert p.classify(ks.OperationalError("server closed the connection unexpectedly")) is K.CONNECTION_LOST
    assert p.classify(ks.InterfaceError("connection already closed")) is K.CONNECTION_LOST
    assert p.classify(ks.extensions.QueryCanceledError("canceling statement")) is K.TIMEOUT
    assert p.classify(ks.IntegrityError("dup")) is K.CONSTRAINT
    assert p.classify(ks.ProgrammingError("syntax")) is K.SYNTAX


@pytest.mark.parametrize(
    ("cls", "code", "kind"),
    [
        ("OperationalError", 2013, K.CONNECTION_LOST),
        ("OperationalError", 2006, K.CONNECTION_LOST),
        ("OperationalError", 1927, K.CONNECTION_LOST),
        ("OperationalError", 1317, K.TIMEOUT),
        ("OperationalError", 1969, K.TIMEOUT),
        ("IntegrityError", 1062, K.CONSTRAINT),
        ("IntegrityError", 1452, K.CONSTRAINT),
        ("ProgrammingError", 1064, K.SYNTAX),
        ("ProgrammingError", 1146, K.SYNTAX),
        ("DataError", 1406, K.DATA),
        ("OperationalError", 1213, K.CONFLICT),
        ("OperationalError", 1045, K.OTHER),  # access denied: a server answer, not a lost link
        ("InterfaceError", 0, K.CONNECTION_LOST),
    ],
)
def test_mysql_classification(cls: str, code: int, kind: ErrorKind) -> None:
    pymysql = pytest.importorskip("pymysql")
    exc = getattr(pymysql.err, cls)(code, "message")
    assert get_profile("mysql").classify(exc) is kind


def test_mysql_dsn() -> None:
    p: Any = get_profile("mysql")
    kw = p._params("mysql://app:p%40ss@db.example:3307/shop?charset=gbk")
    assert kw == {"host": "db.example", "port": 3307, "user": "app", "password": "p@ss", "database": "shop",
                  "charset": "gbk"}
    assert p.compile("SELECT ':a' , :b").sql == "SELECT ':a' , %(b)s"


class _FakeDmError:
    def __init__(self, code: int | None, message: str) -> None:
        self.code = code
        self.message = message


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (-6602, "违反表[T]唯一性约束", K.CONSTRAINT),
        (-2007, "语法分析出错", K.SYNTAX),
        (-2106, "无效的表或视图名[NOPE]", K.SYNTAX),
        (-70028, "Create SOCKET connection failure", K.CONNECTION_LOST),
        (None, "网络通信异常", K.CONNECTION_LOST),
        (-6404, "执行超时", K.TIMEOUT),
        (-9999, "something else", K.OTHER),
    ],
)
def test_dm_classification(code: int | None, message: str, kind: ErrorKind) -> None:
    dm = pytest.importorskip("dmPython")
    exc = dm.DatabaseError(_FakeDmError(code, f"[CODE:{code}]{message}" if code else message))
    assert get_profile("dm").classify(exc) is kind


def test_dm_real_driver_connect_failure_is_connection_lost() -> None:
    pytest.importorskip("dmPython")
    p = get_profile("dm")
    assert p.paramstyle == "qmark" and p.mod.paramstyle == "qmark"  # the driver agrees
    with pytest.raises(Exception) as ei:
        p.connect("dm://SYSDBA:x@127.0.0.1:1/", connect_timeout=1, app_name="xcdb-test", io_timeout=5)
    assert p.classify(ei.value) is K.CONNECTION_LOST
    c = p.compile("SELECT * FROM t WHERE a = :a AND b = ':b' AND c = :c")
    assert c.sql == "SELECT * FROM t WHERE a = ? AND b = ':b' AND c = ?" and c.bind({"a": 1, "c": 2}) == (1, 2)
    assert p._params("dm://SYSDBA:pw@10.0.0.5:5237/APP") == {  # type: ignore[attr-defined]
        "user": "SYSDBA", "password": "pw", "server": "10.0.0.5", "port": 5237, "schema": "APP"}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[GBasedbt][GBasedbt ODBC Driver][GBasedbt]Could not insert new row - duplicate value in a UNIQUE INDEX "
         "column (Unique Index:u1). SQLSTATE=23000 SQLCODE=-268", K.CONSTRAINT),
        ("[GBasedbt][GBasedbt ODBC Driver][GBasedbt]A syntax error has occurred. SQLSTATE=42000 SQLCODE=-201",
         K.SYNTAX),
        ("[GBasedbt][GBasedbt ODBC Driver]Communication link failure SQLSTATE=08S01 SQLCODE=-25582",
         K.CONNECTION_LOST),
        ("[GBasedbt][GBasedbt ODBC Driver][GBasedbt]Statement interrupted by user. SQLSTATE=HY008 SQLCODE=-213",
         K.TIMEOUT),
        ("[GBasedbt][GBasedbt ODBC Driver]Invalid character value SQLSTATE=22018 SQLCODE=-1213", K.DATA),
        ("[GBasedbt] other SQLSTATE=HY000 SQLCODE=-1", K.OTHER),
        # DbtPy's own format: "<ODBC message> SQLCODE=<n>" (the SQLSTATE picks the exception class)
        ("[GBasedbt][GBasedbt ODBC Driver][GBasedbt]Unique constraint (gbasedbt.u101_1) violated. SQLCODE=-268",
         K.CONSTRAINT),
        ("[GBasedbt][GBasedbt ODBC Driver]Network connection is broken. SQLCODE=-25582", K.CONNECTION_LOST),
    ],
)
def test_gbase8s_classification(text: str, kind: ErrorKind) -> None:
    class Error(Exception):  # DbtPyDbi raises PEP 249 classes with the ODBC diagnostics in the text
        pass

    assert get_profile("gbase8s").classify(Error(text)) is kind


def test_gbase8s_falls_back_on_dbapi_classes() -> None:
    class IntegrityError(Exception):
        pass

    class OperationalError(Exception):
        pass

    p = get_profile("gbase8s")
    assert p.classify(IntegrityError("no code here")) is K.CONSTRAINT
    assert p.classify(OperationalError("link down")) is K.CONNECTION_LOST


def test_gbase8s_profile_shape_and_missing_driver_hint() -> None:
    p = get_profile("gbase8s")
    assert p.paramstyle == "qmark" and "systables" in p.health_query
    try:
        import DbtPyDbi  # noqa: F401
    except ImportError:
        with pytest.raises(DriverMissing, match=r"xcstack\[gbase\]"):
            p.mod  # noqa: B018
