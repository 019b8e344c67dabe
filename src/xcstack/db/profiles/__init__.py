"""Driver profiles: what the bridge must know about each blocking DB-API driver, one module per dialect.

`base.py` holds the contract (`DriverProfile`) and the PEP 249 / SQLSTATE fallbacks every dialect
shares; each dialect module holds one driver's connect, cancel, streaming and error codes. Importing
this package imports no driver: a profile loads its driver on first use (`DriverProfile.mod`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from xcstack.db.profiles.base import DriverMissing, DriverProfile, ErrorKind, Row
from xcstack.db.profiles.dm import DMProfile
from xcstack.db.profiles.gbase import GBase8sProfile
from xcstack.db.profiles.kingbase import KingbaseProfile
from xcstack.db.profiles.mysql import MySQLClientProfile, MySQLProfile
from xcstack.db.profiles.postgres import PostgresProfile
from xcstack.db.profiles.sqlite import SQLiteProfile

__all__ = [
    "PROFILES",
    "DMProfile",
    "DriverMissing",
    "DriverProfile",
    "ErrorKind",
    "GBase8sProfile",
    "KingbaseProfile",
    "MySQLClientProfile",
    "MySQLProfile",
    "PostgresProfile",
    "Row",
    "SQLiteProfile",
    "describe",
    "get_profile",
]

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
