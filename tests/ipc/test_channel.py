"""The IPC channel: pipelining, errors, cancellation, dead peers, shared memory."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from xcstack.ipc.channel import IPCClient, IPCRemoteError, IPCServer, IPCTimeout, IPCUnavailable
from xcstack.ipc.framing import FramingError, MsgType, encode_frame, read_frame
from xcstack.ipc.shm import ShmPool, open_handle


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "ipc.sock")


async def handler(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], bytes]:
    op = meta["op"]
    if op == "echo":
        return {"n": len(payload)}, bytes(payload)
    if op == "sleep":
        await asyncio.sleep(meta["s"])
        return {"slept": meta["s"]}, b""
    if op == "fail":
        raise IPCRemoteError("bad_key", "no such key", retriable=False, key="k1")
    if op == "crash":
        raise ValueError("boom")
    if op == "shm":
        with open_handle(meta["h"]) as seg:
            return {"sum": sum(seg.view[:16])}, b""
    raise IPCRemoteError("unknown_op", op)


async def test_frame_roundtrip() -> None:
    reader = asyncio.StreamReader()
    for part in encode_frame(MsgType.REQUEST, 7, {"op": "x", "a": [1, 2]}, b"\x00\x01payload"):
        reader.feed_data(bytes(part))
    frame = await read_frame(reader)
    assert (frame.msg_type, frame.request_id, frame.meta) == (MsgType.REQUEST, 7, {"op": "x", "a": [1, 2]})
    assert bytes(frame.payload) == b"\x00\x01payload"


async def test_garbage_frame_rejected() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"GET / HTTP/1.1\r\n\r\n0000")
    with pytest.raises(FramingError):
        await read_frame(reader)


async def test_pipelined_calls_complete_out_of_order(sock: str) -> None:
    server = IPCServer(sock, handler)
    await server.start()
    client = IPCClient(sock)
    try:
        t0 = time.monotonic()
        slow = asyncio.create_task(client.call("sleep", {"s": 0.3}))
        fast = [client.call("echo", payload=os.urandom(n)) for n in range(1, 200)]
        results = await asyncio.gather(*fast)
        assert [m["n"] for m, _ in results] == list(range(1, 200))
        assert not slow.done(), "the slow call must not block the fast ones on the same connection"
        assert (await slow)[0] == {"slept": 0.3}
        assert time.monotonic() - t0 < 2.0
    finally:
        await client.close()
        await server.close()


async def test_remote_errors_carry_code(sock: str) -> None:
    server = IPCServer(sock, handler)
    await server.start()
    client = IPCClient(sock)
    try:
        with pytest.raises(IPCRemoteError) as info:
            await client.call("fail")
        assert (info.value.code, info.value.retriable, info.value.extra) == ("bad_key", False, {"key": "k1"})
        with pytest.raises(IPCRemoteError) as info2:
            await client.call("crash")
        assert info2.value.code == "internal" and "boom" in info2.value.message
        assert (await client.call("echo", payload=b"ok"))[0] == {"n": 2}, "connection survives handler errors"
    finally:
        await client.close()
        await server.close()


async def test_timeout_cancels_remote_work(sock: str) -> None:
    cancelled = asyncio.Event()

    async def slow(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], bytes]:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}, b""

    server = IPCServer(sock, slow)
    await server.start()
    client = IPCClient(sock)
    try:
        with pytest.raises(IPCTimeout):
            await client.call("slow", timeout=0.1)
        await asyncio.wait_for(cancelled.wait(), 1.0)
    finally:
        await client.close()
        await server.close()


async def test_dead_peer_fails_inflight_calls_at_once(sock: str) -> None:
    server = IPCServer(sock, handler)
    await server.start()
    client = IPCClient(sock)
    calls = [asyncio.create_task(client.call("sleep", {"s": 5}, timeout=30)) for _ in range(10)]
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await server.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, IPCUnavailable) for r in results), results
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(IPCUnavailable):
        await client.call("echo")  # nobody listens any more: fail fast, no hang
    server2 = IPCServer(sock, handler)
    await server2.start()
    try:
        assert (await client.call("echo", payload=b"abc"))[0] == {"n": 3}, "client reconnects lazily"
    finally:
        await client.close()
        await server2.close()


async def test_shared_memory_handle(sock: str) -> None:
    server = IPCServer(sock, handler)
    await server.start()
    client = IPCClient(sock)
    pool = ShmPool(threshold=1024)
    try:
        data = bytes(range(16)) * 100_000
        assert pool.should_share(len(data))
        handle = pool.put(data)
        meta, _ = await client.call("shm", {"h": handle})
        assert meta["sum"] == sum(range(16))
        pool.release(handle)
        assert pool.live == 0
    finally:
        pool.close()
        await client.close()
        await server.close()
