"""Driver profiles: what the bridge must know about each blocking DB-API driver.

A profile says how to connect, which paramstyle the driver speaks, how to classify its errors
(connection lost / timeout / constraint / syntax / data / conflict), how to cancel a running
statement from another thread (protocol cancel, `KILL QUERY` from a side connection, ...), how to
run a transaction and stream rows, and the health query.

Every method here is blocking and runs in the connection's own worker thread, except `cancel`,
which runs in the bridge's canceller thread while the worker is blocked in the driver.

This module holds the contract and the fallbacks every dialect shares (SQLSTATE classes, PEP 249
exception names, URL DSNs); each dialect lives in its own module beside it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
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
        return classify_dbapi_class(exc)


def classify_sqlstate(state: str | None) -> ErrorKind | None:
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


def classify_dbapi_class(exc: BaseException) -> ErrorKind:
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


def parse_url(dsn: str, default_port: int) -> dict[str, Any]:
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


def mod_error(profile: DriverProfile) -> type[BaseException]:
    """The driver's PEP 249 `DatabaseError` (server-side errors, not a broken link)."""
    err = getattr(profile.mod, "DatabaseError", None)
    return err if isinstance(err, type) and issubclass(err, BaseException) else Exception


def kind_not_lost(exc: BaseException) -> ErrorKind:
    """The PEP 249 fallback for an error the server reported: the link evidently works, so never "lost"."""
    kind = classify_dbapi_class(exc)
    return ErrorKind.OTHER if kind is ErrorKind.CONNECTION_LOST else kind
