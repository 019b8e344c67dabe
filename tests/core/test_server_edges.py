"""HTTP server edges, through raw sockets against the worker's real server set-up under uvicorn and Granian:
request-phase timeouts (idle, head, body), the JSON error model for what the server layer rejects, and
request ids that are always the server's own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
IDLE_S, HEAD_S, BODY_S = 1.0, 1.0, 1.5


class EdgeServer:
    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        env = {
            **os.environ, "PYTHONPATH": str(REPO), "XC_DATA_DIR": str(data_dir),
            "XC_SERVER__IDLE_TIMEOUT_S": str(IDLE_S), "XC_SERVER__HEADER_TIMEOUT_S": str(HEAD_S),
            "XC_SERVER__BODY_TIMEOUT_S": str(BODY_S), "XC_SERVER__MAX_URL_BYTES": "1024",
            "XC_OBSERVABILITY__ACCESS_LOG": "false",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.core._edge_serve", str(self.port), kind], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.output)
            try:
                status, _, _ = self.request(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("".join(self.output))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s

    def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        with self.connect() as s:
            s.sendall(raw)
            return parse(read_until_close(s)[0])

    def logs_since(self, mark: int) -> list[str]:
        time.sleep(0.3)
        return self.output[mark:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_until_close(s: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    t0 = time.monotonic()
    s.settimeout(limit)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, body


def json_error(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = parse(raw)
    assert got == status, raw[:500]
    assert headers.get("content-type") == "application/json", raw[:500]
    err = json.loads(body)["error"]
    assert err["code"] == code and err["type"] and err["message"], err
    return dict(err)


@pytest.fixture(scope="module", params=["uvicorn", "granian"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    srv = EdgeServer(request.param, tmp_path_factory.mktemp(f"edge-{request.param}"))
    yield srv
    srv.stop()


# -- timeouts ------------------------------------------------------------------------------------
def test_silent_new_connection_is_closed_after_idle_timeout(server: EdgeServer) -> None:
    with server.connect() as s:
        data, took = read_until_close(s)
    assert data == b"" and IDLE_S * 0.8 <= took < IDLE_S + 2.5, took


def test_trickled_head_is_cut_after_header_timeout(server: EdgeServer) -> None:
    with server.connect() as s:
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        try:
            for i in range(20):  # one header every 0.3 s: every byte in time for an idle timer, never done
                time.sleep(0.3)
                s.sendall(b"X-Slow-%d: v\r\n" % i)
        except OSError:
            pass
        data, _ = read_until_close(s)
        took = time.monotonic() - t0
    assert b"200" not in data and HEAD_S * 0.8 <= took < HEAD_S + 2.5, (took, data)


def test_kept_alive_connection_closes_after_header_timeout(server: EdgeServer) -> None:
    with server.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        data, took = read_until_close(s)
    assert data == b"" and HEAD_S * 0.8 <= took < HEAD_S + 2.5, took


def test_slow_body_gets_408_json_then_close_and_one_info_line(server: EdgeServer) -> None:
    mark = len(server.output)
    with server.connect() as s:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\nX-Request-Id: slow-1\r\n\r\n{\"text\": ")
        data, took = read_until_close(s)  # the server must answer and close, without any more bytes from us
    err = json_error(data, 408, "request_timeout")
    assert "1.5 s" in err["message"]
    assert parse(data)[1].get("connection") == "close"
    assert BODY_S * 0.8 <= took < BODY_S + 2.5, took
    logs = server.logs_since(mark)
    assert sum("request body timed out" in line for line in logs) == 1, logs
    assert not any("Traceback" in line or '"ERROR"' in line for line in logs), logs


def test_client_leaving_mid_body_is_one_info_line(server: EdgeServer) -> None:
    mark = len(server.output)
    with server.connect() as s:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"te")
        time.sleep(0.3)
    logs = server.logs_since(mark)
    gone = [json.loads(line) for line in logs if "client left before sending its whole request body" in line]
    assert len(gone) == 1 and gone[0]["level"] == "INFO", logs
    assert not any("Traceback" in line or '"ERROR"' in line for line in logs), logs


def test_long_answers_are_not_cut_by_request_timeouts(server: EdgeServer) -> None:
    # a handler busy longer than every timeout, and a stream that waits on receive() for a disconnect
    status, _, body = server.request(b"GET /v1/slow?s=2.5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert status == 200 and json.loads(body) == {"slept": True}
    with server.connect() as s:
        s.sendall(b"POST /v1/edge/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        data, took = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 200") and took > 3.0, (took, data)
    assert all(f"chunk{i}".encode() in data for i in range(4)), data


def test_body_within_time_is_served(server: EdgeServer) -> None:
    with server.connect() as s:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"te")
        for part in (b"xt\":", b" \"a", b"b\"}"):  # ~1 s in all: within the body timeout
            time.sleep(0.35)
            s.sendall(part)
        status, _, body = parse(read_until_close(s)[0])
    assert status == 200 and json.loads(body) == {"text": "ab"}


# -- the error model for what the server layer rejects ------------------------------------------------
def test_long_url_is_json_414(server: EdgeServer) -> None:
    path = b"/v1/" + b"a" * 2000
    with server.connect() as s:
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        json_error(read_until_close(s)[0], 414, "url_too_long")


def test_too_many_headers_is_json_431(server: EdgeServer) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(97))  # + Host: 98 > 96, under Granian's own 100
    with server.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
        json_error(read_until_close(s)[0], 431, "too_many_headers")


def test_large_head_is_json_431(server: EdgeServer) -> None:
    with server.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        json_error(read_until_close(s)[0], 431, "headers_too_large")


def test_what_only_the_server_can_reject(server: EdgeServer) -> None:
    """Malformed HTTP and heads beyond the servers' own buffers never reach the app: uvicorn answers JSON
    (our protocol); Granian answers in Rust with an empty body (documented in docs/security.md)."""
    with server.connect() as s:
        s.sendall(b"\x01\x02 not http\r\n\r\n")
        bad = read_until_close(s)[0]
    with server.connect() as s:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 600_000 + b"\r\n\r\n")
        except OSError:
            pass  # the server may close before it has read everything
        huge = read_until_close(s)[0]
    if server.kind == "uvicorn":
        json_error(bad, 400, "malformed_request")
        json_error(huge, 431, "headers_too_large")
    else:
        assert parse(bad)[0] == 400 and parse(huge)[0] == 431


# -- request ids -----------------------------------------------------------------------------------
def test_request_id_is_always_the_servers(server: EdgeServer) -> None:
    status, headers, _ = server.request(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: someone-elses-id\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert headers["x-request-id"] != "someone-elses-id" and len(headers["x-request-id"]) == 32
    assert headers["x-client-request-id"] == "someone-elses-id"
    status, headers, _ = server.request(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: " + b"x" * 65 + b"\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and "x-client-request-id" not in headers  # over 64 characters: dropped


def test_audit_records_keep_the_client_id_apart(tmp_path: Path) -> None:
    from xcstack.app import create_app
    from xcstack.config import load_settings
    from xcstack.security.audit import record as rec
    from xcstack.security.audit.files import list_chains, list_segments
    from xcstack.security.capability import SecurityCapability

    settings = load_settings(None, data_dir=tmp_path, security={"pbkdf2_iterations": 100_000})
    app = create_app(settings, ["xcstack.security.capability", "tests.core.probe_capability"])
    with TestClient(app) as c:
        r = c.post("/v1/echo", json={"text": "a"}, headers={"X-Request-Id": "victims-request-id"})
        assert r.status_code == 401
        rid = r.headers["x-request-id"]
        assert rid != "victims-request-id" and r.headers["x-client-request-id"] == "victims-request-id"
        cap = next(x for x in app.state.xc.capabilities if isinstance(x, SecurityCapability))
        records = [rec.loads(line) for chain in list_chains(cap.audit_root)
                   for _, seg in list_segments(chain) for line in seg.read_bytes().splitlines()]
    denied = [x for x in records if x["action"] == "auth.denied"]
    assert len(denied) == 1, records
    assert denied[0]["request_id"] == rid and denied[0]["client_request_id"] == "victims-request-id"
    assert not any(x.get("request_id") == "victims-request-id" for x in records)
