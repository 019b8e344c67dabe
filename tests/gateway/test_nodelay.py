"""TCP_NODELAY on every accepted socket under both servers: on a reused keep-alive connection (as the
OpenAI SDK reuses them) the first SSE event of a stream must come in a few ms, not after the ~40 ms of
Nagle + delayed ACK it took under Granian. Through a real `xcstack serve` (the supervisor's socket)."""

from __future__ import annotations

import json
import socket
import statistics
import time
from pathlib import Path

import pytest

from tests.core.served import Served
from tests.gateway.conftest import MockUpstream, upstream, write_config

BODY = json.dumps({"model": "mock-model", "stream": True, "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


def _stream_once(sock: socket.socket) -> float:
    """Send one streamed chat on the open connection; seconds to its first `data:` event; read to its end."""
    t0 = time.perf_counter()
    sock.sendall(REQUEST)
    buf = b""
    first = None
    while not buf.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
        if first is None and b"data:" in buf:
            first = time.perf_counter() - t0
    assert b"HTTP/1.1 200" in buf and b"[DONE]" in buf
    assert first is not None
    return first


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
def test_first_sse_event_on_a_reused_connection_is_not_held_by_nagle(
        server: str, mock: MockUpstream, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "data", {"upstreams": [upstream(mock)]})
    served = Served(tmp_path / "data", env={"XC_CONFIG": str(config)}, server=server, plugins="[]").start()
    try:
        with socket.create_connection(("127.0.0.1", served.port)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the client side stays default
            _stream_once(sock)  # warm: the connection is now a reused keep-alive one
            times = [_stream_once(sock) for _ in range(15)]
    finally:
        served.stop()
    # with Nagle on the server side the median was ~40-44 ms; the upstream answers at once
    assert statistics.median(times) < 0.015, [round(t * 1000, 1) for t in times]
