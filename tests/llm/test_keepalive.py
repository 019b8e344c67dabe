"""The gateway's keep-alive pool and an upstream that closes idle connections (llama.cpp's server closes a
connection idle for 5 s): a request that meets a pooled connection closed under it is sent again on a fresh
one; a request a fresh connection drops is not (the stand-in counts what reached it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from xcstack.gateway.settings import BreakerSettings, UpstreamSettings
from xcstack.gateway.upstream import Upstream

BODY = json.dumps({"object": "chat.completion", "choices": []}).encode()


class IdleClosingServer:
    """HTTP/1.1 keep-alive like cpp-httplib: answers, then gives a connection `idle_s` for its next
    request. A request arriving after that on the same connection meets the close (the race: the server
    shuts the socket as the request comes in; nothing is answered). `drop_first`: every connection is
    closed at its first request (an upstream that drops requests), to check those are not retried."""

    def __init__(self, idle_s: float, drop_first: bool = False) -> None:
        self.idle_s = idle_s
        self.drop_first = drop_first
        self.connections = 0
        self.requests = 0
        self.answered = 0
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if self.drop_first or loop.time() - last > self.idle_s:
                    return  # closed under the request: no answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nKeep-Alive: timeout=5\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
                await writer.drain()
                self.answered += 1
                last = loop.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def stand_in() -> AsyncIterator[IdleClosingServer]:
    s = IdleClosingServer(idle_s=0.2)
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    yield s
    s.server.close()
    await s.server.wait_closed()


async def upstream(port: int) -> Upstream:
    up = Upstream(UpstreamSettings(name="idle-closer", base_url=f"http://127.0.0.1:{port}/v1", models=["m"]),
                  BreakerSettings(), queue_timeout_s=1.0)
    await up.start()
    return up


async def post(up: Upstream) -> bytes:
    resp = await up.post(up.url("/chat/completions"), data=b'{"model": "m"}', headers=up.headers)
    body = await resp.read()
    resp.release()
    return body


async def test_a_stale_pooled_connection_is_retried_on_a_fresh_one(stand_in: IdleClosingServer) -> None:
    up = await upstream(stand_in.port)
    try:
        assert await post(up) == BODY
        assert await post(up) == BODY  # within the idle time: the same connection
        assert (stand_in.connections, stand_in.answered) == (1, 2)
        await asyncio.sleep(0.3)  # the server now closes that connection at the next request
        assert await post(up) == BODY  # failed on the pooled connection, answered on a new one
        assert (stand_in.connections, stand_in.requests, stand_in.answered) == (2, 4, 3)
        # the stand-in does reproduce the failure: the plain pooled POST fails the same way
        await asyncio.sleep(0.3)
        assert up.session is not None
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await up.session.post(up.url("/chat/completions"), data=b"{}", headers=up.headers)
    finally:
        await up.stop()


async def test_a_request_a_fresh_connection_drops_is_not_sent_again(stand_in: IdleClosingServer) -> None:
    stand_in.drop_first = True
    up = await upstream(stand_in.port)
    try:
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(up)
        assert (stand_in.connections, stand_in.requests) == (1, 1)  # reached the upstream once
    finally:
        await up.stop()
