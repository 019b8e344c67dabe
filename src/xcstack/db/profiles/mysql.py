"""The MySQL family: MariaDB, MySQL, GBase 8a, OceanBase (MySQL mode), TiDB, through pymysql or mysqlclient.

Statements are cancelled with `KILL QUERY` from a side connection; errors are classified by MySQL's
numeric codes (server codes below 2000, client-side CR_* codes from 2000).
"""

from __future__ import annotations

from typing import Any

from xcstack.db.profiles.base import DriverProfile, ErrorKind, classify_dbapi_class, kind_not_lost, parse_url

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
        p = parse_url(dsn, 3306)
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
        return classify_dbapi_class(exc) if code is None or code >= 2000 else kind_not_lost(exc)


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
