"""KingbaseES through ksycopg2 (psycopg2-compatible, bundles libkci): PostgreSQL's SQLSTATEs and streaming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from xcstack.db.profiles.base import DriverProfile, ErrorKind, Row, classify_dbapi_class, classify_sqlstate
from xcstack.db.profiles.postgres import server_cursor_stream, server_timeout_option
from xcstack.db.sqlparams import CompiledSQL


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
            **server_timeout_option(dsn, io_timeout),
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
        return server_cursor_stream(conn, sql, params, batch, tuple)

    def classify(self, exc: BaseException) -> ErrorKind:
        kind = classify_sqlstate(getattr(exc, "pgcode", None))
        if kind is not None:
            return kind
        mod = self.mod
        if isinstance(exc, mod.extensions.QueryCanceledError):
            return ErrorKind.TIMEOUT
        if isinstance(exc, mod.OperationalError | mod.InterfaceError):
            return ErrorKind.CONNECTION_LOST
        return classify_dbapi_class(exc)
