"""SQLite (stdlib `sqlite3`): the embedded default; WAL on file databases, `interrupt()` as cancel."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from xcstack.db.profiles.base import DriverProfile, ErrorKind

_sqlite_wal_lock = threading.Lock()


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
