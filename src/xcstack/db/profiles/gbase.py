"""GBase 8s (Informix lineage) through DbtPy / DbtPyDbi: SQLCODE / SQLSTATE parsed from the message text."""

from __future__ import annotations

import re
from typing import Any

from xcstack.db.profiles.base import (
    DriverProfile,
    ErrorKind,
    classify_dbapi_class,
    classify_sqlstate,
    kind_not_lost,
    mod_error,
)

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
        by_state = classify_sqlstate(m.group(1) if m else None)
        if by_state is not None:
            return by_state
        return kind_not_lost(exc) if m else classify_dbapi_class(exc)
