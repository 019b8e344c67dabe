"""Audit export: RFC 5424 over TCP and HTTP, at-least-once with a persisted cursor."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from aiohttp import web

from xcstack.security.audit import record as rec
from xcstack.security.audit.export import Exporter, HttpSink, SyslogTcpSink, read_cursor
from xcstack.security.audit.log import AuditLog
from xcstack.security.settings import AuditSettings

SYSLOG_RE = re.compile(
    rb'^<(\d+)>1 (\S+) (\S+) xcstack - (\S+) \[xcaudit@32473 chain="c" seq="(\d+)" hash="([0-9a-f]{64})"\] '
    rb"\xef\xbb\xbf(\{.*\})$"
)


async def _chain(root: Path, n: int) -> AuditLog:
    log = AuditLog(root, AuditSettings(), chain="c")
    await log.open()
    for i in range(n):
        await log.append(actor="u", action="api.call", resource=f"/x/{i}", outcome="failure" if i % 2 else "success")
    return log


def _parse_octet_counted(buf: bytes) -> list[bytes]:
    out = []
    while buf:
        sp = buf.index(b" ")
        n = int(buf[:sp])
        out.append(buf[sp + 1 : sp + 1 + n])
        buf = buf[sp + 1 + n :]
    return out


async def test_syslog_tcp_export_resumes_from_cursor(tmp_path: Path) -> None:
    log = await _chain(tmp_path, 20)
    received = bytearray()
    drop_first = {"on": True}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if drop_first["on"]:  # the collector is down the first time: connection closed at once
            drop_first["on"] = False
            writer.close()
            return
        received.extend(await reader.read())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = SyslogTcpSink(f"tcp://127.0.0.1:{port}", hostname="h1")
    exp = Exporter(tmp_path / "c", sink, batch=7)
    # first attempt may or may not notice the closed peer; keep going until the cursor reaches the end
    for _ in range(10):
        try:
            await exp.run_once()
        except Exception:
            continue
        if exp.cursor == log.durable_seq:
            break
    await sink.close()
    await asyncio.sleep(0.1)
    server.close()
    await server.wait_closed()
    assert read_cursor(tmp_path / "c", "syslog") == log.durable_seq == 21
    msgs = _parse_octet_counted(bytes(received))
    seqs = []
    for m in msgs:
        match = SYSLOG_RE.match(m)
        assert match, m[:120]
        pri, seq, body = int(match.group(1)), int(match.group(5)), match.group(7)
        assert pri in (13 * 8 + 6, 13 * 8 + 4)
        assert rec.loads(body)["seq"] == seq
        seqs.append(seq)
    # at least once: everything after the lost batch arrived, in order, maybe with duplicates
    assert set(range(1, 22)) - set(seqs) <= set(range(1, 8))
    assert seqs[-1] == 21
    await log.close()


async def test_http_export_at_least_once_and_cursor_persisted(tmp_path: Path) -> None:
    log = await _chain(tmp_path, 10)
    got: list[int] = []
    state = {"fail": 1}

    async def collect(request: web.Request) -> web.Response:
        data = await request.json()
        if state["fail"]:
            state["fail"] -= 1
            return web.Response(status=500)
        got.extend(r["seq"] for r in data["records"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/ingest", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/ingest"
    exp = Exporter(tmp_path / "c", HttpSink(url), batch=4)
    try:
        await exp.run_once()
        raise AssertionError("the 500 must fail the batch")
    except RuntimeError:
        pass
    assert read_cursor(tmp_path / "c", "http") == 0
    assert await exp.run_once() == 11
    await exp.sink.close()
    assert got == list(range(1, 12))
    # a restarted exporter resumes from the persisted cursor: only new records go out
    await log.append(actor="u", action="api.call", resource="/y", outcome="success")
    exp2 = Exporter(tmp_path / "c", HttpSink(url), batch=4)
    assert exp2.cursor == 11
    assert await exp2.run_once() == 1
    await exp2.sink.close()
    assert got[-1] == 12
    await runner.cleanup()
    await log.close()


async def test_one_exporter_per_chain_and_sink_at_a_time(tmp_path: Path) -> None:
    from xcstack.security.audit.export import _try_lock

    log = await _chain(tmp_path, 3)

    class Recorder:
        name = "rec"

        def __init__(self) -> None:
            self.got: list[bytes] = []

        async def send(self, records: list[bytes]) -> None:
            self.got += records

        async def close(self) -> None: ...

    held = _try_lock(tmp_path / "c" / "export-rec.lock")  # another process is exporting
    assert held is not None
    sink = Recorder()
    assert await Exporter(tmp_path / "c", sink).run_once() == 0 and sink.got == []
    import os

    os.close(held)
    assert await Exporter(tmp_path / "c", sink).run_once() == 4
    await log.close()
