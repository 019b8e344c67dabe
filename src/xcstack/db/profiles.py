"""Driver profiles: what the bridge must know about each blocking DB-API driver.

A profile says how to connect, which paramstyle the driver speaks, how to classify its errors
(connection lost / timeout / constraint / syntax / data / conflict), how to cancel a running
statement from another thread (protocol cancel, `KILL QUERY` from a side connection, ...), how to
run a transaction and stream rows, and the health query.

Every method here is blocking and runs in the connection's own worker thread, except `cancel`,
which runs in the bridge's canceller thread while the worker is blocked in the driver.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from xcstack.db.sqlparams import CompiledSQL, Paramstyle, compile_sql


class ErrorKind(StrEnum):
    CONNECTION_LOST = "connection_lost"
    TIMEOUT = "timeout"
    CONSTRAINT = "constraint"
    SYNTAX = "syntax"
    DATA = "data"
    CONFLICT = "conflict"
    OTHER = "other"


class DriverMissing(RuntimeError):
    """The driver package is not installed."""


Row = tuple[Any, ...]


class DriverProfile:
    name: ClassVar[str] = ""
    module_name: ClassVar[str] = ""
    extra: ClassVar[str] = ""  # pip extra that installs the driver
    paramstyle: ClassVar[Paramstyle] = "qmark"
    backslash_escapes: ClassVar[bool] = False
    health_query: ClassVar[str] = "SELECT 1"
    cancel_method: ClassVar[str] = "none"  # protocol | kill_query | close_session | interrupt | none
    reuse_cursor: ClassVar[bool] = False  # keep one cursor per connection (less client CPU per query)

    def __init__(self) -> None:
        self._mod: ModuleType | None = None

    # --- loading and connecting ---------------------------------------------------------------
    @property
    def mod(self) -> ModuleType:
        if self._mod is None:
            try:
                self._mod = importlib.import_module(self.module_name)
            except ImportError as exc:
                hint = f" (pip install 'xcstack[{self.extra}]')" if self.extra else ""
                raise DriverMissing(f"driver {self.module_name} for {self.name} is not installed{hint}: {exc}") from exc
        return self._mod

    def compile(self, sql: str) -> CompiledSQL:
        return compile_sql(sql, self.paramstyle, backslash_escapes=self.backslash_escapes)

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        raise NotImplementedError

    def after_connect(self, conn: Any, *, prepare_statements: bool) -> None:
        """Per-connection settings from the database's config."""

    def session_id(self, conn: Any) -> Any:
        """The server's id of this session (backend pid, thread id, ...), for cancel and ops."""
        return None

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        """Stop the statement running on `conn` (called from another thread). True if sent."""
        return False

    def close(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # a broken connection may fail to close; it is dropped anyway
            pass

    # --- running statements -------------------------------------------------------------------
    def execute(self, conn: Any, sql: CompiledSQL, params: dict[str, Any], max_rows: int) -> tuple[
        list[str] | None, list[Row], int
    ]:
        """(columns or None for no result set, up to max_rows+1 rows, rowcount)."""
        reuse = self.reuse_cursor
        cur = getattr(conn, "_xc_cursor", None) if reuse else None
        if cur is None:
            cur = conn.cursor()
        keep = False
        try:
            args = sql.bind(params)
            if args is None:
                cur.execute(sql.sql)
            else:
                cur.execute(sql.sql, args)
            if cur.description is None:
                keep = reuse
                return None, [], int(cur.rowcount if cur.rowcount is not None else -1)
            cols = [d[0] for d in cur.description]
            rows = [tuple(r) for r in cur.fetchmany(max_rows + 1)]
            keep = reuse and len(rows) <= max_rows  # a truncated result is released at once
            return cols, rows, len(rows)
        finally:
            if keep:
                try:
                    conn._xc_cursor = cur
                except AttributeError:  # a C connection type without a __dict__
                    self._close_cursor(cur)
            else:
                if reuse:
                    with contextlib.suppress(AttributeError):
                        conn._xc_cursor = None
                self._close_cursor(cur)

    def stream(self, conn: Any, sql: CompiledSQL, params: dict[str, Any], batch: int) -> tuple[
        list[str], Iterator[list[Row]]
    ]:
        """Column names and an iterator of row batches that fetches from the server as it goes."""
        cur = self._stream_cursor(conn)
        args = sql.bind(params)
        if args is None:
            cur.execute(sql.sql)
        else:
            cur.execute(sql.sql, args)
        cols = [d[0] for d in cur.description] if cur.description else []

        def batches() -> Iterator[list[Row]]:
            try:
                while True:
                    rows = cur.fetchmany(batch)
                    if not rows:
                        return
                    yield [tuple(r) for r in rows]
            finally:
                self._close_cursor(cur)

        return cols, batches()

    def _stream_cursor(self, conn: Any) -> Any:
        return conn.cursor()

    def _close_cursor(self, cur: Any) -> None:
        try:
            cur.close()
        except Exception:
            pass

    def begin(self, conn: Any) -> None:
        conn.autocommit = False

    def commit(self, conn: Any) -> None:
        conn.commit()
        conn.autocommit = True

    def rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        finally:
            conn.autocommit = True

    def ping(self, conn: Any) -> None:
        cur = conn.cursor()
        try:
            cur.execute(self.health_query)
            cur.fetchall()
        finally:
            self._close_cursor(cur)

    # --- errors -------------------------------------------------------------------------------
    def classify(self, exc: BaseException) -> ErrorKind:
        return _classify_dbapi_class(exc)


def _classify_sqlstate(state: str | None) -> ErrorKind | None:
    if not state or len(state) != 5:
        return None
    cls = state[:2]
    if cls == "08" or state in ("57P01", "57P02", "57P03", "53300", "HYT01"):
        return ErrorKind.CONNECTION_LOST
    if state in ("57014", "55P03", "HYT00"):
        return ErrorKind.TIMEOUT
    if cls == "23":
        return ErrorKind.CONSTRAINT
    if cls in ("42", "37") or state == "0A000":
        return ErrorKind.SYNTAX
    if cls == "22":
        return ErrorKind.DATA
    if cls == "40":
        return ErrorKind.CONFLICT
    return None


def _classify_dbapi_class(exc: BaseException) -> ErrorKind:
    """Fallback on the PEP 249 exception class names (every driver has them)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "IntegrityError" in names:
        return ErrorKind.CONSTRAINT
    if "ProgrammingError" in names:
        return ErrorKind.SYNTAX
    if "DataError" in names:
        return ErrorKind.DATA
    if "InterfaceError" in names or "OperationalError" in names:
        return ErrorKind.CONNECTION_LOST
    return ErrorKind.OTHER


def _parse_url(dsn: str, default_port: int) -> dict[str, Any]:
    """host/port/user/password/database/query-options from `scheme://user:pw@host:port/db?k=v`."""
    u = urlsplit(dsn)
    if not u.scheme or not u.netloc:
        raise ValueError("expected a URL DSN: scheme://user:password@host:port/database")
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or default_port,
        "user": unquote(u.username) if u.username else "",
        "password": unquote(u.password) if u.password else "",
        "database": unquote(u.path.lstrip("/")),
        "options": dict(parse_qsl(u.query)),
    }


_sqlite_wal_lock = threading.Lock()


# --- SQLite ---------------------------------------------------------------------------------------
class SQLiteProfile(DriverProfile):
    name = "sqlite"
    module_name = "sqlite3"
    paramstyle = "qmark"
    cancel_method = "interrupt"

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        path = dsn.removeprefix("sqlite:///") if dsn.startswith("sqlite:///") else dsn
        conn = sqlite3.connect(path, timeout=connect_timeout, isolation_level=None)  # thread-checked
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            if path != ":memory:":
                with _sqlite_wal_lock:  # concurrent switches to WAL fail with "database is locked"
                    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        conn.execute("PRAGMA journal_mode = WAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        conn.interrupt()  # documented as safe from another thread
        return True

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def classify(self, exc: BaseException) -> ErrorKind:
        msg = str(exc).lower()
        if isinstance(exc, sqlite3.IntegrityError):
            return ErrorKind.CONSTRAINT
        if "interrupted" in msg:
            return ErrorKind.TIMEOUT
        if "database is locked" in msg or "database table is locked" in msg:
            return ErrorKind.CONFLICT
        if "closed database" in msg or "disk i/o error" in msg or "unable to open" in msg:
            return ErrorKind.CONNECTION_LOST
        if "syntax error" in msg or "no such" in msg or "incomplete input" in msg:
            return ErrorKind.SYNTAX
        if isinstance(exc, sqlite3.DataError | sqlite3.InterfaceError) or "mismatch" in msg:
            return ErrorKind.DATA
        if isinstance(exc, sqlite3.ProgrammingError):
            return ErrorKind.SYNTAX
        return ErrorKind.OTHER


# --- PostgreSQL (psycopg 3) --------------------------------------------------------------------
class PostgresProfile(DriverProfile):
    name = "postgres"
    module_name = "psycopg"
    extra = "postgres"
    paramstyle = "pyformat"
    cancel_method = "protocol"

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        conn = self.mod.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(2, int(connect_timeout + 0.999)),
            application_name=app_name,
            **_server_timeout_option(dsn, io_timeout),
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        return conn

    def after_connect(self, conn: Any, *, prepare_statements: bool) -> None:
        if not prepare_statements:  # behind a transaction-mode pooler (pgbouncer, ...)
            conn.prepare_threshold = None

    def session_id(self, conn: Any) -> Any:
        return conn.info.backend_pid

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        if hasattr(conn, "cancel_safe"):
            conn.cancel_safe(timeout=timeout)  # non-blocking-protocol cancel (psycopg >= 3.2)
        else:
            conn.cancel()
        return True

    def execute(self, conn: Any, sql: CompiledSQL, params: dict[str, Any], max_rows: int) -> tuple[
        list[str] | None, list[Row], int
    ]:
        # One cursor per connection, reused: a third less client CPU per query than a new cursor
        # each time (and that CPU is GIL time the event loop would wait for).
        cur = getattr(conn, "_xc_cursor", None)
        if cur is None or cur.closed:
            cur = conn._xc_cursor = conn.cursor()
        cur.execute(sql.sql, sql.bind(params))
        if cur.description is None:
            return None, [], int(cur.rowcount)
        cols = [d.name for d in cur.description]
        rows = cur.fetchmany(max_rows + 1)
        if cur.rowcount > len(rows):  # a big result stays in libpq memory until replaced: drop it now
            cur.close()
            conn._xc_cursor = None
        return cols, rows, len(rows)

    def stream(self, conn: Any, sql: CompiledSQL, params: dict[str, Any], batch: int) -> tuple[
        list[str], Iterator[list[Row]]
    ]:
        return _server_cursor_stream(conn, sql, params, batch)

    def classify(self, exc: BaseException) -> ErrorKind:
        kind = _classify_sqlstate(getattr(exc, "sqlstate", None))
        if kind is not None:
            return kind
        mod = self.mod
        if isinstance(exc, mod.errors.QueryCanceled):
            return ErrorKind.TIMEOUT
        if isinstance(exc, mod.OperationalError | mod.InterfaceError):
            return ErrorKind.CONNECTION_LOST
        return _classify_dbapi_class(exc)


def _server_cursor_stream(
    conn: Any, sql: CompiledSQL, params: dict[str, Any], batch: int, convert: Callable[[Any], Row] | None = None
) -> tuple[list[str], Iterator[list[Row]]]:
    """Open a named (server-side) cursor, which needs a transaction on the worker's own connection,
    and stream its rows in batches (PostgreSQL via psycopg and KingbaseES via ksycopg2 alike)."""
    conn.autocommit = False
    cur = conn.cursor(name="xc_stream")
    cur.itersize = batch
    try:
        cur.execute(sql.sql, sql.bind(params))
        first = cur.fetchmany(batch)
    except BaseException:
        _abort_stream(conn, cur)
        raise
    cols = [d[0] for d in cur.description] if cur.description else []
    return cols, _server_cursor_batches(conn, cur, first, batch, convert)


def _server_cursor_batches(
    conn: Any, cur: Any, first: list[Any], batch: int, convert: Callable[[Any], Row] | None = None
) -> Iterator[list[Row]]:
    """Row batches from an open server-side cursor; closing it always ends the transaction it
    needed and puts the connection back in autocommit (PostgreSQL and KingbaseES alike)."""
    try:
        rows = first
        while rows:
            yield rows if convert is None else [convert(r) for r in rows]
            rows = cur.fetchmany(batch)
    finally:
        try:
            cur.close()
            conn.rollback()
        finally:
            conn.autocommit = True


def _abort_stream(conn: Any, cur: Any) -> None:
    """A server-side cursor failed to open: leave the connection in autocommit, as it was."""
    for step in (cur.close, conn.rollback):
        try:
            step()
        except Exception:
            pass
    try:
        conn.autocommit = True
    except Exception:
        pass


def _server_timeout_option(dsn: str, seconds: float) -> dict[str, str]:
    """A server-side statement_timeout above every query's own timeout: if this process dies
    mid-query (no one left to cancel), the server still stops the statement. A DSN that sets its
    own `options` keeps them."""
    if "options" in dsn:
        return {}
    return {"options": f"-c statement_timeout={int(seconds * 1000)}"}


# --- KingbaseES (ksycopg2, psycopg2-compatible) ------------------------------------------------
class KingbaseProfile(DriverProfile):
    name = "kingbase"
    module_name = "ksycopg2"
    extra = "kingbase"
    paramstyle = "pyformat"
    cancel_method = "protocol"

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        conn = self.mod.connect(
            dsn,
            connect_timeout=max(2, int(connect_timeout + 0.999)),
            application_name=app_name,
            **_server_timeout_option(dsn, io_timeout),
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        conn.autocommit = True
        return conn

    def session_id(self, conn: Any) -> Any:
        return conn.get_backend_pid()

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        conn.cancel()  # libkci's PQcancel: thread-safe
        return True

    def stream(self, conn: Any, sql: CompiledSQL, params: dict[str, Any], batch: int) -> tuple[
        list[str], Iterator[list[Row]]
    ]:
        return _server_cursor_stream(conn, sql, params, batch, tuple)

    def classify(self, exc: BaseException) -> ErrorKind:
        kind = _classify_sqlstate(getattr(exc, "pgcode", None))
        if kind is not None:
            return kind
        mod = self.mod
        if isinstance(exc, mod.extensions.QueryCanceledError):
            return ErrorKind.TIMEOUT
        if isinstance(exc, mod.OperationalError | mod.InterfaceError):
            return ErrorKind.CONNECTION_LOST
        return _classify_dbapi_class(exc)


# --- MySQL family (pymysql): MariaDB, MySQL, GBase 8a, OceanBase (MySQL mode), TiDB ----------
_MYSQL_LOST = {1040, 1053, 1077, 1152, 1184, 1927, 2002, 2003, 2006, 2013, 2014, 2045, 2055, 4031}
_MYSQL_TIMEOUT = {1205, 1317, 1969, 3024}
_MYSQL_CONSTRAINT = {1022, 1048, 1062, 1169, 1216, 1217, 1364, 1451, 1452, 1557, 1586, 3819, 4025}
_MYSQL_SYNTAX = {1049, 1052, 1054, 1064, 1109, 1110, 1146, 1149, 1305, 1327, 1630}
_MYSQL_DATA = {1264, 1265, 1292, 1366, 1367, 1406, 1411, 1690}
_MYSQL_CONFLICT = {1213, 1614}


class MySQLProfile(DriverProfile):
    name = "mysql"
    module_name = "pymysql"
    extra = "mysql"
    paramstyle = "pyformat"
    backslash_escapes = True
    cancel_method = "kill_query"
    reuse_cursor = True

    def _params(self, dsn: str) -> dict[str, Any]:
        p = _parse_url(dsn, 3306)
        opts = p.pop("options")
        kw: dict[str, Any] = {
            "host": p["host"],
            "port": p["port"],
            "user": p["user"] or "root",
            "password": p["password"],
            "database": p["database"] or None,
            "charset": opts.pop("charset", "utf8mb4"),
        }
        if "unix_socket" in opts:
            kw["unix_socket"] = opts.pop("unix_socket")
        return kw

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        return self.mod.connect(
            **self._params(dsn),
            autocommit=True,
            connect_timeout=connect_timeout,
            read_timeout=io_timeout,
            write_timeout=io_timeout,
            program_name=app_name,
        )

    def session_id(self, conn: Any) -> Any:
        return conn.thread_id()

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        if session_id is None:
            return False
        side = self.mod.connect(**self._params(dsn), connect_timeout=timeout, read_timeout=timeout, autocommit=True)
        try:
            with side.cursor() as cur:
                cur.execute(f"KILL QUERY {int(session_id)}")
        finally:
            side.close()
        return True

    def _stream_cursor(self, conn: Any) -> Any:
        return conn.cursor(self.mod.cursors.SSCursor)  # unbuffered: rows come as they are read

    def close(self, conn: Any) -> None:
        # An abandoned unbuffered result would try to drain the closed socket when collected.
        result = getattr(conn, "_result", None)
        if result is not None and getattr(result, "unbuffered_active", False):
            result.unbuffered_active = False
        super().close(conn)

    def begin(self, conn: Any) -> None:
        conn.begin()

    def commit(self, conn: Any) -> None:
        conn.commit()

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def classify(self, exc: BaseException) -> ErrorKind:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code is not None:
            for codes, kind in (
                (_MYSQL_LOST, ErrorKind.CONNECTION_LOST),
                (_MYSQL_TIMEOUT, ErrorKind.TIMEOUT),
                (_MYSQL_CONSTRAINT, ErrorKind.CONSTRAINT),
                (_MYSQL_SYNTAX, ErrorKind.SYNTAX),
                (_MYSQL_DATA, ErrorKind.DATA),
                (_MYSQL_CONFLICT, ErrorKind.CONFLICT),
            ):
                if code in codes:
                    return kind
        mod = self.mod
        if isinstance(exc, mod.InterfaceError) or isinstance(exc, ConnectionError | OSError):
            return ErrorKind.CONNECTION_LOST
        if isinstance(exc, mod.OperationalError) and (code is None or code >= 2000):
            return ErrorKind.CONNECTION_LOST  # client-side (CR_*) errors: the link is gone
        return _classify_dbapi_class(exc) if code is None or code >= 2000 else _kind_not_lost(exc)


class MySQLClientProfile(MySQLProfile):
    """The same MySQL family through mysqlclient (MySQLdb, C): parses in C and releases the GIL
    while it waits on the network, so worker threads hold the GIL far less than with pymysql."""

    name = "mysqlclient"
    module_name = "MySQLdb"
    extra = "mysqlclient"

    def _params(self, dsn: str) -> dict[str, Any]:
        kw = super()._params(dsn)
        kw["passwd"] = kw.pop("password")
        db = kw.pop("database")
        if db:
            kw["db"] = db
        return kw

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        return self.mod.connect(
            **self._params(dsn),
            autocommit=True,
            connect_timeout=max(1, int(connect_timeout + 0.999)),
            read_timeout=max(1, int(io_timeout + 0.999)),
            write_timeout=max(1, int(io_timeout + 0.999)),
        )

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        if session_id is None:
            return False
        t = max(1, int(timeout + 0.999))
        side = self.mod.connect(**self._params(dsn), connect_timeout=t, read_timeout=t, autocommit=True)
        try:
            cur = side.cursor()
            cur.execute(f"KILL QUERY {int(session_id)}")
            cur.close()
        finally:
            side.close()
        return True

    def close(self, conn: Any) -> None:
        DriverProfile.close(self, conn)


def mod_error(profile: DriverProfile) -> type[BaseException]:
    """The driver's PEP 249 `DatabaseError` (server-side errors, not a broken link)."""
    err = getattr(profile.mod, "DatabaseError", None)
    return err if isinstance(err, type) and issubclass(err, BaseException) else Exception


def _kind_not_lost(exc: BaseException) -> ErrorKind:
    kind = _classify_dbapi_class(exc)
    return ErrorKind.OTHER if kind is ErrorKind.CONNECTION_LOST else kind


# --- DM8 (dmPython) ------------------------------------------------------------------------------
_DM_LOST = {-70028, -70019, -70025, -70101, -70102, -6001, -6002, -6003, -6010, -6011, -6012, -6013, -6014}
_DM_SYNTAX = {-2007, -2106, -2110, -2111, -2116, -2120, -2124, -2207}
_DM_CONSTRAINT = {-6602, -6603, -6604, -6605, -6606, -6607, -6608, -6609, -6610, -6611, -6612, -6625, -6626}
_DM_DATA = {-6102, -6105, -6106, -6108, -6111, -6112, -6116, -6118, -6130}
_DM_TIMEOUT = {-6404, -6407, -6408}
_DM_LOST_WORDS = ("socket", "network", "网络", "通信", "连接", "connection", "disconnect", "断开")


class DMProfile(DriverProfile):
    name = "dm"
    module_name = "dmPython"
    extra = "dm"
    paramstyle = "qmark"
    cancel_method = "close_session"

    def _params(self, dsn: str) -> dict[str, Any]:
        p = _parse_url(dsn, 5236)
        kw: dict[str, Any] = {
            "user": p["user"] or "SYSDBA",
            "password": p["password"],
            "server": p["host"],
            "port": p["port"],
        }
        if p["database"]:
            kw["schema"] = p["database"]
        return kw

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        mod = self.mod
        return mod.connect(
            **self._params(dsn),
            autoCommit=True,
            login_timeout=max(1, int(connect_timeout + 0.999)),
            app_name=app_name,
        )

    def session_id(self, conn: Any) -> Any:
        cur = conn.cursor()
        try:
            cur.execute("SELECT SESSID()")
            row = cur.fetchone()
            return row[0] if row else None
        except mod_error(self):  # no session id: a timed-out statement's connection is only dropped
            return None
        finally:
            self._close_cursor(cur)

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        if session_id is None:
            return False
        side = self.mod.connect(**self._params(dsn), autoCommit=True, login_timeout=max(1, int(timeout + 0.999)))
        try:
            cur = side.cursor()
            cur.execute(f"SP_CLOSE_SESSION({int(session_id)})")  # ends the statement with its session
            cur.close()
        finally:
            side.close()
        return True

    def classify(self, exc: BaseException) -> ErrorKind:
        code, msg = _dm_code(exc)
        if code in _DM_LOST:
            return ErrorKind.CONNECTION_LOST
        if code in _DM_CONSTRAINT or "约束" in msg or "constraint" in msg:
            return ErrorKind.CONSTRAINT
        if code in _DM_SYNTAX or "语法" in msg or "syntax" in msg:
            return ErrorKind.SYNTAX
        if code in _DM_TIMEOUT or "超时" in msg or "timeout" in msg or "取消" in msg or "cancel" in msg:
            return ErrorKind.TIMEOUT
        if code in _DM_DATA:
            return ErrorKind.DATA
        if any(w in msg for w in _DM_LOST_WORDS):
            return ErrorKind.CONNECTION_LOST
        return _kind_not_lost(exc)


def _dm_code(exc: BaseException) -> tuple[int | None, str]:
    """dmPython raises Error(DmError) where DmError has .code (negative int) and .message."""
    arg = exc.args[0] if exc.args else None
    code = getattr(arg, "code", None)
    msg = str(getattr(arg, "message", None) or arg or exc)
    if not isinstance(code, int):
        m = re.search(r"\[CODE:(-?\d+)\]", msg)
        code = int(m.group(1)) if m else None
    return code, msg.lower()


# --- GBase 8s (DbtPy / DbtPyDbi, Informix lineage) ---------------------------------------------
_GBASE_LOST = {-908, -1803, -25580, -25582, -27001, -27002, -439, -11017, -11020}
_GBASE_CONSTRAINT = {-268, -239, -391, -530, -691, -692, -703}
_GBASE_SYNTAX = {-201, -206, -217, -236, -324, -674}
_GBASE_DATA = {-1213, -1215, -1226, -1260, -1262, -1264, -1205}
_GBASE_TIMEOUT = {-213, -243, -244, -245, -154}


class GBase8sProfile(DriverProfile):
    name = "gbase8s"
    module_name = "DbtPyDbi"
    extra = "gbase"
    paramstyle = "qmark"
    health_query = "SELECT 1 FROM systables WHERE tabid = 1"
    cancel_method = "close_session"

    def connect(self, dsn: str, *, connect_timeout: float, app_name: str, io_timeout: float) -> Any:
        # DSN: "SERVER=gbase01;DATABASE=db;HOST=127.0.0.1;SERVICE=9088;PROTOCOL=onsoctcp;UID=..;PWD=.."
        conn = self.mod.connect(dsn, "", "")
        self._set_autocommit(conn, True)
        return conn

    def _set_autocommit(self, conn: Any, on: bool) -> None:
        setter = getattr(conn, "set_autocommit", None)
        if setter is not None:
            setter(on)
        else:
            conn.autocommit = on

    def session_id(self, conn: Any) -> Any:
        cur = conn.cursor()
        try:
            cur.execute("SELECT DBINFO('sessionid') FROM systables WHERE tabid = 1")
            row = cur.fetchone()
            return row[0] if row else None
        except mod_error(self):
            return None
        finally:
            self._close_cursor(cur)

    def cancel(self, conn: Any, session_id: Any, dsn: str, *, timeout: float) -> bool:
        """`onmode -z` through the SQL admin API; needs DBSA rights (else the connection is only dropped)."""
        if session_id is None:
            return False
        side = self.mod.connect(dsn, "", "")
        try:
            self._set_autocommit(side, True)
            cur = side.cursor()
            cur.execute(f"EXECUTE FUNCTION sysadmin:task('onmode', 'z', '{int(session_id)}')")
            cur.close()
        finally:
            side.close()
        return True

    def begin(self, conn: Any) -> None:
        self._set_autocommit(conn, False)

    def commit(self, conn: Any) -> None:
        conn.commit()
        self._set_autocommit(conn, True)

    def rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        finally:
            self._set_autocommit(conn, True)

    def classify(self, exc: BaseException) -> ErrorKind:
        text = str(exc)
        m = re.search(r"SQLSTATE[=: ]+([0-9A-Z]{5})", text)
        code_m = re.search(r"SQLCODE[=: ]+(-?\d+)", text)
        code = int(code_m.group(1)) if code_m else None
        for codes, kind in (
            (_GBASE_LOST, ErrorKind.CONNECTION_LOST),
            (_GBASE_CONSTRAINT, ErrorKind.CONSTRAINT),
            (_GBASE_SYNTAX, ErrorKind.SYNTAX),
            (_GBASE_DATA, ErrorKind.DATA),
            (_GBASE_TIMEOUT, ErrorKind.TIMEOUT),
        ):
            if code in codes:
                return kind
        by_state = _classify_sqlstate(m.group(1) if m else None)
        if by_state is not None:
            return by_state
        return _kind_not_lost(exc) if m else _classify_dbapi_class(exc)


PROFILES: dict[str, type[DriverProfile]] = {
    p.name: p
    for p in (SQLiteProfile, PostgresProfile, KingbaseProfile, MySQLProfile, MySQLClientProfile, DMProfile,
              GBase8sProfile)
}

_lock = threading.Lock()
_instances: dict[str, DriverProfile] = {}


def get_profile(name: str) -> DriverProfile:
    with _lock:
        if name not in _instances:
            try:
                _instances[name] = PROFILES[name]()
            except KeyError:
                raise ValueError(f"unknown driver {name!r}; known: {', '.join(sorted(PROFILES))}") from None
        return _instances[name]


def describe() -> Sequence[dict[str, str]]:
    """One line per profile (for docs and `doctor`)."""
    return [
        {"driver": p.name, "module": p.module_name, "paramstyle": p.paramstyle, "cancel": p.cancel_method}
        for p in PROFILES.values()
    ]
