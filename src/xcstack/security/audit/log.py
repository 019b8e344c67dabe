"""The audit log writer: one SM3 hash chain per writer process, group-committed, crash-safe.

Layout (one directory per chain under the audit root)::

    <root>/<chain>/.lock                 flock held by the one process writing this chain
    <root>/<chain>/seg-000000000001.log  segment files, named by their first sequence number
    <root>/<chain>/seg-000000000001.log.gz  a closed segment, compressed once sealed (`archive`)
    <root>/<chain>/seg-000000000001.seal    the SM2-signed checkpoint of a closed segment's last record
    <root>/<chain>/checkpoints.log       SM2-signed checkpoints {chain, seq, hash, ts, key_id, sig}
    <root>/<chain>/export-<name>.cursor  the exporters' persisted cursors

Several http worker processes each take their own chain: `AuditLog.open()` locks the first free
`<node>-<n>` directory (flock, released by the kernel when the process dies, so a respawned worker
takes over a dead worker's chain and recovers its tail). One chain has exactly one writer; no
cross-process locking is needed on the append path.

Appends go through one writer thread: callers enqueue, the thread takes everything queued,
chains and serialises it, does one write + one fdatasync, then resolves all the callers' futures
at once (group commit). A caller's `await append(...)` returns only after its record is durable.
A failed write fails every caller in the batch (fail closed: the request is answered 503).

Durability by event class (`durability = "by_class"`, the default): security events go through
`append` as above. Data-plane call records (`api.call`) go through `append_call`, which enqueues in
order and returns at once; the writer commits them at the latest `data_plane_flush_ms` after the
oldest was enqueued (sooner when a security event arrives: it carries every earlier record with it).
A crash loses at most the data-plane records of that window (plus one commit's duration); a failed
commit loses its data-plane records (counted, logged) and makes every later `append_call` wait like
`append` until a commit succeeds again (fail closed). `durability = "strict"` makes `append_call`
wait too.

Start-up rule (`open`): before a writer appends to or signs anything in a chain it verifies it
(`verify.start_scan`, bounded, plus the last checkpoint's SM2 signature). A chain that is damaged,
or that holds records no signed checkpoint covers (a forged append, or the tail a crash left: the
two cannot be told apart), is never signed over: `on_integrity_failure = "refuse"` raises
`AuditIntegrityError` naming the chain and positions; "read_only" leaves the chain untouched,
alerts, and takes a fresh chain that starts with an `audit.integrity_failure` record. An operator
who has inspected an unsigned tail accepts it with `open(accept_through=...)` (`xcstack audit
accept-tail`), which appends an `audit.tail_accepted` record and signs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from xcstack.aio import cancel_and_wait
from xcstack.errors import Overloaded
from xcstack.observability.logs import client_request_id_for
from xcstack.observability.metrics import QUEUE_DEPTH
from xcstack.security.audit import record as rec
from xcstack.security.audit.files import (
    CHECKPOINTS,
    SEGMENT_RE,
    fsync_dir,
    list_segments,
    read_segment,
    seal_path,
    segment_name,
)
from xcstack.security.protocol import SecurityCode
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import Signer

log = logging.getLogger("xcstack.security.audit")

AUDIT_RECORDS = Counter("xc_audit_records_total", "Audit records made durable")
AUDIT_COMMITS = Counter("xc_audit_commits_total", "Audit group commits (one write + fdatasync each)")
AUDIT_ERRORS = Counter("xc_audit_write_errors_total", "Audit writes that failed (their callers got 503)")
AUDIT_CP_ERRORS = Counter("xc_audit_checkpoint_failures_total", "Audit checkpoints that could not be signed")
AUDIT_INTEGRITY = Counter("xc_audit_integrity_failures_total",
                          "Audit chains that failed the start-up check (refused, or left read-only)", ["mode"])
AUDIT_LOST = Counter("xc_audit_data_plane_lost_total",
                     "Data-plane audit records whose group commit failed after their response went out")
AUDIT_PENDING = QUEUE_DEPTH.labels("audit")

GZ_LEVEL = 6  # gzip -6: ~10x on audit JSON lines at ~40 MB/s of one core; -9 gains ~3% for 2-3x the CPU
MAX_RECORD_BYTES = 64 * 1024


class AuditUnavailable(Overloaded):
    code = SecurityCode.AUDIT_UNAVAILABLE


class AuditIntegrityError(RuntimeError):
    """A chain failed the start-up check and `on_integrity_failure = "refuse"`."""

    def __init__(self, problem: Any) -> None:  # verify.Problem (imported lazily: verify imports this module)
        super().__init__(f"audit log integrity check failed, refusing to start: {problem}")
        self.problem = problem


SigVerify = Callable[[str, bytes, bytes], Awaitable[bool]]  # (key_id, message, signature) -> ok; LookupError


def utc_ts(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class RecoveryReport:
    segment: str
    truncated_bytes: int
    dropped_lines: int
    last_good_seq: int


@dataclass
class _Plan:
    """What crash recovery would do to the tail (computed before anything is changed)."""

    cut: dict[str, int] = field(default_factory=dict)  # segment name -> new size (0: delete)
    report: RecoveryReport | None = None
    seq: int = 0
    prev: bytes = rec.GENESIS
    keep: Path | None = None  # the segment appends continue in


@dataclass
class _Item:
    record: dict[str, Any] | None  # None: a flush marker (resolved with the last durable seq)
    loop: asyncio.AbstractEventLoop | None
    waiter: Any  # asyncio.Future[int], _Blocking, or None (a data-plane record nobody waits for)
    durable: bool = True  # commit now; False: within data_plane_flush_ms
    t: float = 0.0  # time.monotonic() at enqueue


class _Blocking:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.seq = 0
        self.error: BaseException | None = None


def _resolve(results: list[tuple[asyncio.Future[int], int | BaseException]]) -> None:
    for fut, res in results:
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class AuditLog:
    """Append-only, SM3-chained, durable audit log for one chain (one writer process)."""

    def __init__(
        self,
        root: Path,
        settings: AuditSettings | None = None,
        *,
        chain: str | None = None,
        signer: Signer | None = None,
        clock: Callable[[], float] = time.time,
        sig_verify: SigVerify | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings = settings or AuditSettings()
        self._chain_name = chain
        self.signer = signer
        self.clock = clock
        self.chain = ""
        self.dir = self.root
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seg_path: Path | None = None
        self._seg_size = 0
        self._seg_opened = 0.0
        self.seq = 0
        self.prev = rec.GENESIS
        self.durable_seq = 0
        self.durable_hash = rec.GENESIS
        self.checkpointed_seq = 0
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self._durable_waiting = 0  # queued items someone waits for: commit without delay
        self._degraded = False  # the last commit failed: data-plane appends wait until one succeeds
        self.lost_total = 0  # data-plane records whose commit failed
        self._closed: dict[int, tuple[int, bytes]] = {}  # closed segment's first seq -> (last seq, hash)
        self._verified_from = 0  # the first seq the start check hash-verified (0: none)
        self._archive_lock = asyncio.Lock()
        self._cp_task: asyncio.Task[None] | None = None
        self._cp_lock = asyncio.Lock()
        self.recovery: RecoveryReport | None = None
        self.appended_total = 0
        self.sig_verify = sig_verify  # checks the last checkpoint at start; default: the signer's own key
        self.integrity_failures: list[Any] = []  # verify.Problem of chains left read-only at start
        self._accepted: dict[str, Any] | None = None

    # -- open / recover -----------------------------------------------------------------------
    def open_blocking(self) -> None:
        """Open without the async signature check: for unsigned logs only (sync callers, tests)."""
        if self.signer is not None:
            raise RuntimeError("a signed audit log is opened with `await open()` (start-up verification)")
        self._prepare()
        self._take_chain(set())
        try:
            check = self._check_blocking()
        except BaseException:
            self._release()
            raise
        if check.problem is not None:
            self._release()
            AUDIT_INTEGRITY.labels("refuse").inc()
            raise AuditIntegrityError(check.problem)
        self._start_writer()

    async def open(self, *, accept_through: int | None = None, actor: str = "system", reason: str = "") -> None:
        """Verify the chain, then start writing. `accept_through`: the operator has inspected the
        unsigned tail ending at that seq and accepts it (recorded as `audit.tail_accepted`)."""
        await asyncio.to_thread(self._prepare)
        skip: set[str] = set()
        while True:
            await asyncio.to_thread(self._take_chain, skip)
            try:
                problem = await self._start_check(accept_through)
            except BaseException:
                self._release()
                raise
            if problem is None:
                break
            self._release()
            if self.settings.on_integrity_failure != "read_only" or accept_through is not None:
                AUDIT_INTEGRITY.labels("refuse").inc()
                log.critical("audit chain %s: %s", problem.chain, AuditIntegrityError(problem))
                raise AuditIntegrityError(problem)
            AUDIT_INTEGRITY.labels("read_only").inc()
            log.critical("AUDIT INTEGRITY FAILURE: %s; the chain is left read-only (never appended to or signed), "
                         "writing to another chain (on_integrity_failure = read_only)", problem)
            self.integrity_failures.append(problem)
            skip.add(problem.chain)
        await asyncio.to_thread(self._start_writer)
        for p in self.integrity_failures:
            await self.append(actor="system", action="audit.integrity_failure", resource=f"audit:{p.chain}",
                              outcome="failure", detail={**p.__dict__, "message": str(p), "mode": "read_only"})
        if self.recovery is not None:
            r = self.recovery
            await self.append(
                actor="system",
                action="audit.recovered",
                resource=f"audit:{self.chain}",
                outcome="success",
                detail={
                    "segment": r.segment,
                    "truncated_bytes": r.truncated_bytes,
                    "dropped_lines": r.dropped_lines,
                    "last_good_seq": r.last_good_seq,
                },
            )
        if self._accepted is not None:
            await self.append(actor=actor, action="audit.tail_accepted", resource=f"audit:{self.chain}",
                              outcome="success", detail={**self._accepted, "reason": reason[:1024]})
        detail: dict[str, Any] = {"pid": os.getpid()}
        if self.signer is not None:
            detail["key_id"] = self.signer.key_id  # says this chain is signed: verify fails without checkpoints
        await self.append(actor="system", action="audit.start", resource=f"audit:{self.chain}", outcome="success",
                          detail=detail)
        if self.signer is not None:
            try:
                await self.checkpoint()
            except Exception as exc:  # the HSM owner may still be starting: the loop retries
                log.warning("audit chain %s: first checkpoint failed (%s); retrying in the background",
                            self.chain, exc)
            self._cp_task = asyncio.get_running_loop().create_task(self._checkpoint_loop())

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _start_writer(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._run, name=f"xc-audit-{self.chain}", daemon=True)
        self._thread.start()

    def _check_blocking(self) -> Any:
        from xcstack.security.audit.verify import start_scan

        check = start_scan(self.dir, self._plan_recovery().cut, self.settings.startup_verify_max_bytes,
                           self.signer is not None)
        self._verified_from = check.verified_from if check.problem is None else 0
        return check

    async def _start_check(self, accept_through: int | None) -> Any:
        """None when the locked chain may be written and signed; else the verify.Problem."""
        from xcstack.security.audit.verify import Problem

        check = await asyncio.to_thread(self._check_blocking)
        if check.problem is not None:
            return check.problem
        cp = check.last_cp
        if cp is not None and self.signer is not None:
            msg = rec.checkpoint_message(str(cp.get("chain")), cp["seq"], str(cp.get("hash")), str(cp.get("ts")))
            key_id = str(cp.get("key_id"))
            try:
                good = cp.get("chain") == self.chain and await self._verify(key_id, msg, bytes.fromhex(cp["sig"]))
                why = "SM2 signature invalid (forged or altered checkpoint)"
            except LookupError:
                good, why = False, f"no trusted public key for key id {key_id!r}"
            except (ValueError, TypeError, KeyError):
                good, why = False, "malformed checkpoint"
            if not good:
                return Problem(self.chain, cp["seq"], cp.get("_file", CHECKPOINTS), cp["_line"], cp["_offset"],
                               f"last checkpoint (seq {cp['seq']}): {why}")
        command = f"xcstack audit accept-tail --chain {self.chain} --through"
        if check.tail is None:
            if accept_through is not None:
                return Problem(self.chain, check.last_seq + 1, "", 0, 0,
                               f"nothing to accept: a signed checkpoint covers the chain up to seq {check.last_seq}")
            return None
        first, last = check.tail
        if accept_through == last:
            self._accepted = {"first_seq": first, "last_seq": last, "last_hash": check.last_hash,
                              "signed_seq": check.signed_seq}
            log.warning("audit chain %s: unsigned records %d..%d accepted by the operator", self.chain, first, last)
            return None
        seg, line, offset = check.tail_at
        reason = (f"records {first}..{last} are not covered by a signed checkpoint (last signed: seq "
                  f"{check.signed_seq}): a forged append, or the tail of a crash (kill -9, power loss); they are "
                  f"not signed over. Inspect them (`xcstack audit verify --chain {self.chain}`), then accept "
                  f"them with `{command} {last}`, or set [security.audit] on_integrity_failure = \"read_only\"")
        if accept_through is not None:
            reason = f"the unsigned tail is {first}..{last}, not ..{accept_through}: inspect it again; " + reason
        return Problem(self.chain, first, seg, line, offset, reason)

    async def _verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        if self.sig_verify is not None:
            return await self.sig_verify(key_id, message, signature)
        if self.signer is None or key_id != self.signer.key_id:
            raise LookupError(key_id)
        return await self.signer.verify(message, signature)

    def _release(self) -> None:
        """Give the chain's lock back (after a failed start check), touching nothing in it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._accepted = None

    def _take_chain(self, skip: set[str]) -> None:
        """Lock the first free chain not in `skip`: `<node>-<n>`, or the configured name (then, when
        a failed check put it in `skip`, `<name>.<n>`)."""
        base = self._chain_name
        node = self.settings.node or re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "node"
        for n in range(4096):
            name = (base if n == 0 else f"{base}.{n}") if base else f"{node}-{n}"
            if name in skip:
                continue
            d = self.root / name
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if base and n == 0:
                    raise RuntimeError(f"audit chain {name} is held by another process") from None
                continue
            self._lock_fd = fd
            self.chain = name
            self.dir = d
            return
        raise RuntimeError("no free audit chain")

    def _plan_recovery(self) -> _Plan:
        """Only the tail is repaired (see `_valid_tail`); nothing is changed here."""
        plan = _Plan()
        segs = list_segments(self.dir)
        while segs:
            _first, path = segs[-1]
            data = path.read_bytes()
            good_end, last_seq, last_hash, dropped = _valid_tail(data)
            if good_end < len(data):
                plan.cut[path.name] = good_end
                plan.report = RecoveryReport(path.name, len(data) - good_end, dropped, last_seq)
            if good_end == 0:
                segs.pop()
                continue
            plan.seq, plan.prev, plan.keep = last_seq, last_hash, path
            break
        return plan

    def _recover(self) -> None:
        plan = self._plan_recovery()
        for name, end in plan.cut.items():
            path = self.dir / name
            if end == 0:
                path.unlink()
                fsync_dir(self.dir)
            else:
                with open(path, "r+b") as fh:
                    fh.truncate(end)
                    fh.flush()
                    os.fsync(fh.fileno())
        if plan.report is not None:
            r = plan.report
            self.recovery = r
            log.warning("audit chain %s: torn tail of %d bytes truncated in %s", self.chain, r.truncated_bytes,
                        r.segment)
        self.seq, self.prev = plan.seq, plan.prev
        self.durable_seq, self.durable_hash = self.seq, self.prev
        self.checkpointed_seq = _last_checkpoint_seq(self.dir / CHECKPOINTS)
        self._open_segment(reuse=plan.keep)

    def _open_segment(self, reuse: Path | None = None) -> None:
        if self._fd is not None:
            os.close(self._fd)
        path = reuse or self.dir / segment_name(self.seq + 1)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg_path = path
        self._seg_size = os.fstat(self._fd).st_size
        self._seg_opened = self.clock()
        if reuse is None:
            fsync_dir(self.dir)

    # -- append -------------------------------------------------------------------------------
    def _make(
        self,
        actor: str,
        action: str,
        resource: str,
        outcome: str,
        ip: str | None,
        request_id: str | None,
        detail: dict[str, Any] | None,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {"actor": actor, "action": action, "resource": resource, "outcome": outcome}
        if ip:
            r["ip"] = ip
        if request_id:
            r["request_id"] = request_id
            client_id = client_request_id_for(request_id)  # the client's own X-Request-Id, kept apart
            if client_id:
                r["client_request_id"] = client_id
        if detail:
            r["detail"] = detail
        return r

    def _enqueue(self, item: _Item) -> None:
        with self._cond:
            if self._closing:
                raise AuditUnavailable("audit log is closed", retry_after=1)
            if len(self._pending) >= self.settings.max_pending:
                raise AuditUnavailable("audit log queue is full", retry_after=1)
            item.t = time.monotonic()
            self._pending.append(item)
            if item.durable:
                self._durable_waiting += 1
                self._cond.notify()
            elif len(self._pending) == 1:  # the writer starts the window's timer; later ones do not wake it
                self._cond.notify()

    async def append(
        self,
        *,
        actor: str,
        action: str,
        resource: str,
        outcome: str,
        ip: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """Append one record; returns its sequence number once it is durable on disk."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._enqueue(_Item(self._make(actor, action, resource, outcome, ip, request_id, detail), loop, fut))
        return await fut

    async def append_call(
        self,
        *,
        actor: str,
        action: str,
        resource: str,
        outcome: str,
        ip: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append a data-plane call record: in order, durable within `data_plane_flush_ms`, without
        waiting for it (strict mode, or after a failed commit: waits like `append`). Raises
        AuditUnavailable at once when the queue is full or the log closed (fail closed)."""
        if self.settings.durability == "strict" or self._degraded:
            await self.append(actor=actor, action=action, resource=resource, outcome=outcome, ip=ip,
                              request_id=request_id, detail=detail)
            return
        self._enqueue(_Item(self._make(actor, action, resource, outcome, ip, request_id, detail), None, None,
                            durable=False))

    async def flush(self) -> int:
        """Wait until every record enqueued before this call is durable; returns the durable seq."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._enqueue(_Item(None, loop, fut))
        return await fut

    def append_blocking(
        self,
        *,
        actor: str,
        action: str,
        resource: str,
        outcome: str,
        ip: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> int:
        w = _Blocking()
        self._enqueue(_Item(self._make(actor, action, resource, outcome, ip, request_id, detail), None, w))
        if not w.event.wait(timeout):
            raise AuditUnavailable("audit write timed out")
        if w.error is not None:
            raise w.error
        return w.seq

    def _run(self) -> None:
        window = self.settings.data_plane_flush_ms / 1000.0
        max_batch = self.settings.max_batch
        while True:
            with self._cond:
                while True:
                    pending = self._pending
                    if not pending:
                        if self._closing:
                            return
                        self._cond.wait()
                        continue
                    if self._durable_waiting or self._closing or len(pending) >= max_batch:
                        break
                    wait = pending[0].t + window - time.monotonic()  # only data-plane records queued
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                batch = self._pending[:max_batch]
                del self._pending[:max_batch]
                if self._durable_waiting:
                    self._durable_waiting -= sum(1 for item in batch if item.durable)
                AUDIT_PENDING.set(len(self._pending))
            self._commit(batch)

    def _encode(self, r: dict[str, Any], prev: bytes) -> tuple[bytes, bytes]:
        """Encode one record; a detail that is not JSON or too large is replaced (never fail a batch)."""
        try:
            line, digest = rec.encode(r, prev)
        except (TypeError, ValueError) as exc:
            r["detail"] = {"unserializable": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
            line, digest = rec.encode(r, prev)
        if len(line) > MAX_RECORD_BYTES:
            size = len(line)
            r["detail"] = {"truncated": True, "size": size}
            for k in ("resource", "actor", "action", "outcome", "ip", "request_id"):
                if isinstance(r.get(k), str) and len(r[k]) > 1024:
                    r[k] = r[k][:1024] + "…"
            line, digest = rec.encode(r, prev)
        return line, digest

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _commit(self, batch: list[_Item]) -> None:
        outcome: list[int | BaseException] = []
        try:
            now = self.clock()
            ts = utc_ts(now)
            limit = self.settings.segment_max_bytes
            if self._seg_size >= limit or (
                self._seg_size > 0 and now - self._seg_opened >= self.settings.rotate_interval_s
            ):
                self._rotate()
            chunks: list[bytes] = []
            size = 0
            seq, prev = self.seq, self.prev
            for item in batch:
                r = item.record
                if r is None:  # a flush marker: durable once everything before it is
                    outcome.append(seq)
                    continue
                if chunks and self._seg_size + size >= limit:  # rotate inside a large batch too
                    self._write_all(b"".join(chunks))
                    self._seg_size += size
                    self.seq, self.prev = seq, prev
                    self._rotate()
                    chunks, size = [], 0
                seq += 1
                r["seq"] = seq
                r["ts"] = ts
                r["chain"] = self.chain
                line, prev = self._encode(r, prev)
                chunks.append(line)
                size += len(line)
                outcome.append(seq)
            if chunks:
                self._write_all(b"".join(chunks))
                self._seg_size += size
            assert self._fd is not None
            if self.settings.sync == "fsync":
                os.fsync(self._fd)
            else:
                os.fdatasync(self._fd)
            self.seq, self.prev = seq, prev
            self.durable_seq, self.durable_hash = seq, prev
            self.appended_total += len(batch)
            self._degraded = False
            AUDIT_RECORDS.inc(len(batch))
            AUDIT_COMMITS.inc()
        except BaseException as exc:  # fail every caller of the batch, then re-read the head from disk
            lost = sum(1 for item in batch if item.waiter is None)
            log.error("audit write failed: %s%s", exc, f"; {lost} data-plane records lost" if lost else "")
            AUDIT_ERRORS.inc()
            if lost:
                AUDIT_LOST.inc(lost)
                self.lost_total += lost
            self._degraded = True  # fail closed: data-plane callers wait until a commit succeeds again
            err = AuditUnavailable(f"audit log write failed: {exc.__class__.__name__}")
            outcome = [err] * len(batch)
            try:
                self._reload()
            except Exception as exc2:
                log.error("audit log could not re-read its chain head: %s", exc2)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | BaseException]]] = {}
        for item, res in zip(batch, outcome, strict=True):
            if item.waiter is None:
                continue
            if item.loop is None:
                w: _Blocking = item.waiter
                if isinstance(res, BaseException):
                    w.error = res
                else:
                    w.seq = res
                w.event.set()
            else:
                by_loop.setdefault(item.loop, []).append((item.waiter, res))
        for loop, results in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, results)

    def _reload(self) -> None:
        """After a failed write: some records of the batch may be on disk (never acknowledged; that
        is allowed), so continue from what the files really hold."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._recover()

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        m = SEGMENT_RE.match(self._seg_path.name) if self._seg_path is not None else None
        if m and self._seg_size > 0:  # the closed segment's end, for its seal (`archive`)
            self._closed[int(m.group(1))] = (self.seq, self.prev)
        self._open_segment()

    # -- checkpoints ------------------------------------------------------------------------------
    async def checkpoint(self) -> dict[str, Any] | None:
        """Sign (seq, hash) of the last durable record and append it to checkpoints.log."""
        if self.signer is None:
            return None
        async with self._cp_lock:
            seq, digest = self.durable_seq, self.durable_hash
            if seq == 0 or seq == self.checkpointed_seq:
                return None
            ts = utc_ts(self.clock())
            sig = await self.signer.sign(rec.checkpoint_message(self.chain, seq, digest.hex(), ts))
            cp = {"chain": self.chain, "seq": seq, "hash": digest.hex(), "ts": ts, "key_id": self.signer.key_id,
                  "sig": sig.hex()}
            await asyncio.to_thread(_append_fsync, self.dir / CHECKPOINTS, rec.canonical(cp) + b"\n")
            self.checkpointed_seq = seq
            return cp

    async def _checkpoint_loop(self) -> None:
        interval = self.settings.checkpoint_interval_s
        every = self.settings.checkpoint_every_records
        waited = 0.0
        step = min(interval, 0.5)
        while True:
            await asyncio.sleep(step)
            waited += step
            if waited >= interval or self.durable_seq - self.checkpointed_seq >= every:
                waited = 0.0
                try:
                    await self.checkpoint()
                except Exception as exc:  # keep running; the next tick retries
                    AUDIT_CP_ERRORS.inc()
                    log.error("audit checkpoint failed: %s", exc)
            if self._closed:
                try:
                    await self.archive()
                except Exception as exc:
                    AUDIT_CP_ERRORS.inc()
                    log.error("audit chain %s: sealing a closed segment failed: %s", self.chain, exc)

    # -- archival -------------------------------------------------------------------------------
    async def archive(self) -> list[str]:
        """Seal each closed segment (an SM2-signed checkpoint of its last record, `seg-N.seal`), then
        compress it (`.log.gz`). Returns the segments compressed. A closed segment's end is known
        exactly to the writer that closed it; one closed by an earlier process is sealed only when
        the start check hash-verified it (else it waits for an operator's `xcstack audit verify`)."""
        if self.signer is None:
            return []
        done: list[str] = []
        async with self._archive_lock:
            segs = await asyncio.to_thread(list_segments, self.dir)
            for i, (first, path) in enumerate(segs[:-1]):
                if path == self._seg_path:
                    break
                seal = seal_path(path)
                if not seal.exists():
                    end = self._closed.get(first)
                    if end is None and self._verified_from and first >= self._verified_from:
                        end = await asyncio.to_thread(_segment_end, path, segs[i + 1][1])
                    if end is None:
                        continue
                    ts = utc_ts(self.clock())
                    sig = await self.signer.sign(rec.checkpoint_message(self.chain, end[0], end[1].hex(), ts))
                    cp = {"chain": self.chain, "seq": end[0], "hash": end[1].hex(), "ts": ts,
                          "key_id": self.signer.key_id, "sig": sig.hex()}
                    await asyncio.to_thread(_write_atomic, seal, rec.canonical(cp) + b"\n")
                self._closed.pop(first, None)
                if not path.name.endswith(".gz"):
                    await asyncio.to_thread(_compress, path)
                    done.append(path.name)
        return done

    # -- retention ------------------------------------------------------------------------------
    async def purge_expired(self, min_exported_seq: int | None = None) -> list[str]:
        """Delete whole segments (and their seals) whose newest record is older than the retention
        period; each deletion is itself audited, durably, before the file goes (with the purged
        segment's last seq and hash: the anchor the remaining chain restarts from, signed by the next
        checkpoint)."""
        cutoff = self.clock() - self.settings.retention_days * 86400
        purged: list[str] = []
        segs = list_segments(self.dir)
        for first, path in segs[:-1]:
            if self._seg_path is not None and path == self._seg_path:
                break
            last = await asyncio.to_thread(_last_record, path)
            if last is None:
                break
            ts = dt.datetime.strptime(last["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
            if ts >= cutoff or (min_exported_seq is not None and last["seq"] > min_exported_seq):
                break
            await self.append(
                actor="system", action="audit.purge", resource=f"audit:{self.chain}", outcome="success",
                detail={"segment": path.name, "first_seq": first, "last_seq": last["seq"], "last_hash": last["hash"]},
            )
            path.unlink()
            seal_path(path).unlink(missing_ok=True)
            purged.append(path.name)
        if purged:
            await asyncio.to_thread(fsync_dir, self.dir)
        return purged

    # -- close ----------------------------------------------------------------------------------
    async def close(self) -> None:
        if self._thread is None:
            return
        await cancel_and_wait([self._cp_task])
        with contextlib.suppress(Exception):
            await self.append(actor="system", action="audit.stop", resource=f"audit:{self.chain}",
                              outcome="success")
        try:
            await self.checkpoint()  # an honest stop leaves no unsigned tail for the next start's check
        except Exception as exc:
            AUDIT_CP_ERRORS.inc()
            log.error("audit chain %s: the final checkpoint failed (%s): records %d..%d stay unsigned and the "
                      "next start refuses this chain until `xcstack audit accept-tail`", self.chain, exc,
                      self.checkpointed_seq + 1, self.durable_seq)
        await asyncio.to_thread(self.close_blocking)

    def close_blocking(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _append_fsync(path: Path, data: bytes) -> None:
    """Append one line; a partial last line (a crash during the previous append) is ended first, so
    it stays one malformed line instead of swallowing this one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _compress(path: Path) -> Path:
    """`seg-N.log` -> `seg-N.log.gz` (checked by decompressing before the original goes; the mtime,
    which the records API uses to skip old segments, is kept)."""
    import gzip

    data = path.read_bytes()
    packed = gzip.compress(data, GZ_LEVEL, mtime=0)
    if gzip.decompress(packed) != data:  # pragma: no cover - zlib bug or memory error
        raise OSError(f"{path.name}: compressed copy does not match")
    out = path.with_name(path.name + ".gz")
    _write_atomic(out, packed)
    st = path.stat()
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.unlink()
    fsync_dir(path.parent)
    return out


def _segment_end(path: Path, nxt: Path) -> tuple[int, bytes] | None:
    """(last seq, hash) of a closed segment when its records chain from its first prev_hash and the
    next segment's first record chains from its last; None otherwise (left to `audit verify`)."""
    lines = read_segment(path).split(b"\n")
    if lines.pop() != b"" or not lines:
        return None
    try:
        prev = bytes.fromhex(rec.loads(lines[0])["prev_hash"])
        seq = int(rec.loads(lines[0])["seq"]) - 1
        for line in lines:
            digest = rec.check(line, prev)
            if digest is None or int(rec.loads(line)["seq"]) != seq + 1:
                return None
            prev, seq = digest, seq + 1
        head = read_segment(nxt).split(b"\n", 1)[0]
        if rec.loads(head).get("prev_hash") != prev.hex():
            return None
    except Exception:
        return None
    return seq, prev


def _last_checkpoint_seq(path: Path) -> int:
    if not path.exists():
        return 0
    last = 0
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(Exception):
            last = max(last, int(rec.loads(line)["seq"]))
    return last


def _last_record(path: Path) -> dict[str, Any] | None:
    data = read_segment(path)
    lines = data.rstrip(b"\n").rsplit(b"\n", 1)
    if not lines or not lines[-1]:
        return None
    try:
        out: dict[str, Any] = rec.loads(lines[-1])
        return out
    except Exception:
        return None


def _valid_tail(data: bytes) -> tuple[int, int, bytes, int]:
    """(end offset of the last intact record, its seq, its raw hash, trailing lines dropped).

    Only the tail is repaired: a partial last line (no newline, or NUL padding after a power
    loss) and complete trailing lines that do not verify against their own prev_hash. Damage
    earlier in the file is not a crash artefact; it is left for `audit verify` to report."""
    end = data.rfind(b"\n") + 1
    dropped = 1 if end < len(data) else 0
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = data[start : end - 1]
        parsed = _self_check(line)
        if parsed is not None:
            return end, parsed[0], parsed[1], dropped
        dropped += 1
        end = start
    return 0, 0, rec.GENESIS, dropped


def _self_check(line: bytes) -> tuple[int, bytes] | None:
    try:
        obj = rec.loads(line)
        prev = bytes.fromhex(obj["prev_hash"])
        digest = rec.check(line, prev)
        if digest is None:
            return None
        return int(obj["seq"]), digest
    except Exception:
        return None
