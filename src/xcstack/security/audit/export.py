"""Export audit records to a central collector with at-least-once delivery.

Each (chain, exporter) pair keeps a cursor file, `export-<name>.cursor`, holding the last sequence
number the collector acknowledged; it is replaced atomically (write, fsync, rename) only after the
acknowledgement, so a crash re-sends at most one batch (duplicates are possible, loss is not;
collectors de-duplicate on (chain, seq)).

- syslog: RFC 5424 messages over TCP with octet-counting framing (RFC 6587 §3.4.1), facility
  13 (log audit). TCP gives no application acknowledgement: a batch counts as delivered when
  the kernel accepted it (`drain`); a broken connection re-sends from the cursor.
- HTTP: `POST {"records": [...]}` (the records exactly as stored, hashes included); any 2xx
  acknowledges the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from xcstack.security.audit import record as rec
from xcstack.security.audit.files import list_segments, read_segment

log = logging.getLogger("xcstack.security.audit.export")


class Sink(Protocol):
    name: str

    async def send(self, records: Sequence[bytes]) -> None:
        """Deliver the raw record lines (without newline); raise on failure."""
        ...

    async def close(self) -> None: ...


def read_cursor(chain_dir: Path, name: str) -> int:
    try:
        return int((chain_dir / f"export-{name}.cursor").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def write_cursor(chain_dir: Path, name: str, seq: int) -> None:
    path = chain_dir / f"export-{name}.cursor"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{seq}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(chain_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_after(chain_dir: Path, after: int, limit: int) -> list[tuple[int, bytes]]:
    """Up to `limit` complete record lines with seq > after, in order."""
    segs = list_segments(chain_dir)
    out: list[tuple[int, bytes]] = []
    for i, (first, path) in enumerate(segs):
        nxt = segs[i + 1][0] if i + 1 < len(segs) else None
        if nxt is not None and nxt <= after + 1:
            continue
        try:
            data = read_segment(path)
        except FileNotFoundError:  # compressed meanwhile (`AuditLog.archive`): read the .gz
            data = read_segment(path.with_name(path.name + ".gz"))
        seq = first
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # a record being written; never export a partial line
            if seq > after:
                out.append((seq, data[pos:nl]))
                if len(out) >= limit:
                    return out
            seq += 1
            pos = nl + 1
    return out


def syslog_message(line: bytes, hostname: str, app: str = "xcstack") -> bytes:
    obj = rec.loads(line)
    severity = 6 if obj.get("outcome") in ("success", "allow") else 4
    pri = 13 * 8 + severity
    msgid = "".join(c for c in str(obj.get("action", "-")) if 33 <= ord(c) <= 126)[:32] or "-"
    sd = '[xcaudit@32473 chain="{}" seq="{}" hash="{}"]'.format(
        _sd_escape(str(obj.get("chain", ""))), obj.get("seq", ""), obj.get("hash", "")
    )
    header = f"<{pri}>1 {obj.get('ts', '-')} {hostname} {app} - {msgid} {sd} "
    return header.encode() + b"\xef\xbb\xbf" + line


def _sd_escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class SyslogTcpSink:
    def __init__(self, url: str, timeout: float = 10.0, hostname: str | None = None) -> None:
        hostport = url.removeprefix("tcp://")
        host, _, port = hostport.rpartition(":")
        self.host, self.port = host, int(port)
        self.timeout = timeout
        self.hostname = hostname or socket.gethostname() or "-"
        self.name = "syslog"
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, records: Sequence[bytes]) -> None:
        try:
            if self._writer is None or self._writer.is_closing():
                _, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout
                )
            assert self._writer is not None
            frames = []
            for line in records:
                msg = syslog_message(line, self.hostname)
                frames.append(f"{len(msg)} ".encode() + msg)
            self._writer.write(b"".join(frames))
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            w, self._writer = self._writer, None
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)


class HttpSink:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self.name = "http"
        self._session: Any = None

    async def send(self, records: Sequence[bytes]) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = b'{"records":[' + b",".join(records) + b"]}"
        async with self._session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"collector answered HTTP {resp.status}")

    async def close(self) -> None:
        if self._session is not None:
            s, self._session = self._session, None
            await s.close()


def _try_lock(path: Path) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Exporter:
    """Ships one chain's records to one sink, from the persisted cursor on."""

    def __init__(self, chain_dir: Path, sink: Sink, batch: int = 500) -> None:
        self.chain_dir = chain_dir
        self.sink = sink
        self.batch = batch
        self.cursor = read_cursor(chain_dir, sink.name)
        self.errors = 0

    async def run_once(self) -> int:
        """Send everything after the cursor; returns the number of records acknowledged. One exporter
        per (chain, sink) at a time across processes (flock): a concurrent run returns 0."""
        fd = await asyncio.to_thread(_try_lock, self.chain_dir / f"export-{self.sink.name}.lock")
        if fd is None:
            return 0
        try:
            self.cursor = await asyncio.to_thread(read_cursor, self.chain_dir, self.sink.name)
            return await self._send_all()
        finally:
            os.close(fd)

    async def _send_all(self) -> int:
        sent = 0
        while True:
            batch = await asyncio.to_thread(read_after, self.chain_dir, self.cursor, self.batch)
            if not batch:
                return sent
            await self.sink.send([line for _, line in batch])
            last = batch[-1][0]
            await asyncio.to_thread(write_cursor, self.chain_dir, self.sink.name, last)
            self.cursor = last
            sent += len(batch)

    async def run_forever(self, interval: float) -> None:
        backoff = interval
        while True:
            try:
                await self.run_once()
                backoff = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.warning("audit export to %s failed (cursor %d): %s", self.sink.name, self.cursor, exc)
                backoff = min(backoff * 2, 60.0)
            await asyncio.sleep(backoff)
