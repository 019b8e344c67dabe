"""Shared fixtures: settings on a temp data dir, free ports, a served app on a real socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

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
