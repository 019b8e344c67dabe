"""worker.py serves granian on the supervisor's inherited socket through granian's private
`_init_shared_socket` / `granian._granian.SocketHolder`: pyproject.toml pins the versions verified, and
this test fails on an installed granian outside the pin or one whose private seam changed."""

from __future__ import annotations

import importlib.metadata
import inspect
import socket
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from xcstack.worker import inherited_socket_server

granian = pytest.importorskip("granian")
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _pin() -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "granian")


def test_granian_is_pinned_and_the_installed_version_is_inside_the_pin() -> None:
    spec = _pin().specifier
    assert any(s.operator == "<" for s in spec), f"granian must have an upper bound: {spec}"
    assert importlib.metadata.version("granian") in spec


def test_the_private_socket_seam_is_there() -> None:
    from granian.server import common
    from granian.server.embed import Server

    # the embedded server initialises its socket through the method we override, and serves the fd we set
    assert "self._init_shared_socket()" in inspect.getsource(Server.startup)
    assert "_init_shared_socket" in vars(common.AbstractServer)
    assert "self._shd" in inspect.getsource(Server)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        server = inherited_socket_server(sock, 8)(lambda *a: None, address="127.0.0.1", port=sock.getsockname()[1])
        server._init_shared_socket()
        assert server._sfd == sock.fileno()
        assert server._shd.get_fd() == sock.fileno()
    finally:
        sock.close()
