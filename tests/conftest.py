"""Shared fixtures: settings on a temp data dir, free ports, a served app on a real socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# CI (XC_REQUIRE_BACKENDS=1) turns a skip for a backend this machine has into a failure: PostgreSQL,
# MariaDB, Redis, SoftHSM, Milvus Lite, the embedded PostgreSQL (pgvector). DM8 and GBase stay optional.
# Read before the scrub below removes XC_* variables.
REQUIRE_BACKENDS = os.environ.get("XC_REQUIRE_BACKENDS") == "1"
BACKEND_WORDS = ("postgresql", "postgres", "mariadb", "mysql", "redis", "softhsm", "milvus", "pgvector",
                 "embedded")

# Tests must never pick up a developer's config file or XC_* variables by accident.
for _key in [k for k in os.environ if k.startswith("XC_") and not k.startswith("XC_TEST_")]:
    del os.environ[_key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "data"
    d.mkdir()
    yield d


def is_backend_skip(reason: str) -> bool:
    """Whether a skip's reason names a backend CI must have (PostgreSQL, MariaDB, Redis, SoftHSM, Milvus
    Lite, the embedded PostgreSQL) rather than an optional one (DM8, GBase) or a property of the host."""
    low = reason.lower()
    return any(w in low for w in BACKEND_WORDS) and not any(w in low for w in ("dm8", "gbase"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if not REQUIRE_BACKENDS:
        return
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and isinstance(report.longrepr, tuple) and is_backend_skip(str(report.longrepr[2])):
        report.outcome = "failed"
        report.longrepr = f"XC_REQUIRE_BACKENDS=1: a required backend was skipped: {report.longrepr[2]}"
