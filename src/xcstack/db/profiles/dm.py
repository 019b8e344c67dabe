"""DM8 (Dameng) through dmPython: a statement is stopped by closing its session from a side connection."""

from __future__ import annotations

import re
from typing import Any

from xcstack.db.profiles.base import DriverProfile, ErrorKind, kind_not_lost, mod_error, parse_url

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
        p = parse_url(dsn, 5236)
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
        return kind_not_lost(exc)


def _dm_code(exc: BaseException) -> tuple[int | None, str]:
    """dmPython raises Error(DmError) where DmError has .code (negative int) and .message."""
    arg = exc.args[0] if exc.args else None
    code = getattr(arg, "code", None)
    msg = str(getattr(arg, "message", None) or arg or exc)
    if not isinstance(code, int):
        m = re.search(r"\[CODE:(-?\d+)\]", msg)
        code = int(m.group(1)) if m else None
    return code, msg.lower()
