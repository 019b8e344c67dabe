"""Structured JSON logs; every line written while serving a request carries its request id."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from typing import Any

from xcstack.httputil import dumps

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("xc_request_id", default=None)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return dumps(entry).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        rid = request_id_var.get()
        return f"{base} [rid={rid}]" if rid else base


def setup_logging(level: str = "INFO", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JSONFormatter() if json_format else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

# (server request id, client's own id) of the request being served: lets the audit log add the
# client's id to a record about this request without every caller passing it along
_client_request_ids: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "xc_client_request_id", default=None
)


def set_client_request_id(request_id: str, client_id: str | None) -> contextvars.Token[tuple[str, str] | None]:
    return _client_request_ids.set((request_id, client_id) if client_id else None)


def reset_client_request_id(token: contextvars.Token[tuple[str, str] | None]) -> None:
    _client_request_ids.reset(token)


def client_request_id_for(request_id: str | None) -> str | None:
    """The `X-Request-Id` the client sent with the request `request_id` (the server's id), if this code
    runs for that request; None otherwise. Never trusted as an id: kept beside the server's."""
    cur = _client_request_ids.get()
    return cur[1] if cur is not None and cur[0] == request_id else None
