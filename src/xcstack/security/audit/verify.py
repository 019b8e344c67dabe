"""`xcstack audit verify`: check every chain and name the first bad position.

Detected, per chain:
- a modified record (hash mismatch) or a malformed one (not a record line);
- a deleted record (sequence gap), reordered records (sequence goes backwards or jumps);
- a torn/truncated last record (no newline at the end);
- truncation of whole records (a signed checkpoint names a sequence number past the end);
- a forged checkpoint (bad SM2 signature) or a checkpoint that disagrees with the log;
- an unsigned tail: records after the last signed checkpoint while no writer holds the chain
  (a clean shutdown signs its tail; a crash leaves one until an operator accepts it with
  `xcstack audit accept-tail`, and so does a forger). A live writer's tail is normal.
- a missing or emptied checkpoints.log when the chain's own `audit.start` records say a signing
  writer wrote it (their `detail.key_id`).
- segments deleted from the front without the `audit.purge` records retention writes.
- a compressed segment that cannot be read, and a segment seal (`seg-N.seal`, a signed checkpoint
  of a closed segment's last record) that is forged or disagrees with the log.

`verify_archive` checks an exported archive (`xcstack audit export --archive`) offline: the same
checks, except that the archive may start after seq 1 (the anchor is a purge record or a seal of the
previous segment, else a warning names the first seq) and every record must be covered by a signed
checkpoint or seal inside the archive (no writer is ever live there).

`start_scan` is the bounded check a writer runs before it takes a chain over (see `AuditLog.open`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcstack.security.audit import record as rec
from xcstack.security.audit.files import (
    CHECKPOINTS,
    SEAL_SUFFIX,
    chain_is_live,
    list_chains,
    list_segments,
    read_segment,
)

SigVerify = Callable[[str, bytes, bytes], Awaitable[bool]]  # (key_id, message, signature) -> ok


@dataclass
class Problem:
    chain: str
    seq: int  # the first bad sequence number (the position a good log would have there)
    segment: str
    line: int  # 1-based line in the segment file (0: not in a segment)
    offset: int  # byte offset in the segment file
    reason: str

    def __str__(self) -> str:
        where = f"{self.segment} line {self.line} (byte {self.offset})" if self.segment else "checkpoints"
        return f"chain {self.chain}: first bad record at seq {self.seq}, {where}: {self.reason}"


@dataclass
class ChainReport:
    chain: str
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    last_hash: str = ""
    checkpoints: int = 0
    signed_seq: int = 0
    signatures_checked: bool = False
    live: bool = False
    problem: Problem | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "checkpoints": self.checkpoints,
            "signed_seq": self.signed_seq,
            "signatures_checked": self.signatures_checked,
            "live": self.live,
            "problem": None if self.problem is None else {**self.problem.__dict__, "message": str(self.problem)},
            "warnings": self.warnings,
        }


@dataclass
class _Scan:
    records: int = 0
    expected: int = 0  # the next seq
    prev: bytes = rec.GENESIS
    anchor: tuple[int, str] | None = None  # (first seq, prev_hash) when the chain starts after a purge
    purges: dict[int, str] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)
    signed_claim: tuple[int, str] | None = None  # (seq, key_id) of the first audit.start of a signing writer
    problem: Problem | None = None


PARALLEL_MIN_BYTES = 256 * 1024 * 1024  # below this, process start-up costs more than it saves
CHUNK_BYTES = 8 * 1024 * 1024


def scan_chain(chain_dir: Path, workers: int | None = None, archive: bool = False
               ) -> tuple[ChainReport, dict[int, str]]:
    """Verify the hash chain of one directory (blocking). Returns the report and the hash of each
    record named by a checkpoint (for the signature pass).

    Large chains are verified in parallel (`workers` processes; default: the CPUs this process may
    use): chunks of segments are checked independently, each from the prev_hash its first record
    states, then stitched (each chunk's first prev_hash must equal the previous chunk's last hash
    and sequence numbers must continue). Any failure falls back to the sequential scan, which names
    the exact first bad position."""
    chain = chain_dir.name
    report = ChainReport(chain)
    cps = _read_checkpoints(chain_dir / CHECKPOINTS, report) + _read_seals(chain_dir, report)
    want = {cp["seq"] for cp in cps}
    segs = list_segments(chain_dir)
    st: _Scan | None = None
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > 1 and sum(p.stat().st_size for _, p in segs) >= PARALLEL_MIN_BYTES:
        try:
            st = _scan_parallel(segs, want, workers)
        except Exception:
            st = None
    if st is None:
        st = _scan_sequential(chain, segs, want)
    report.records = st.records
    seen_hashes = st.seen
    # the summary holds in every case: what was verified before the first problem, and the checkpoints read
    report.first_seq = segs[0][0] if segs else 0
    report.last_seq = st.expected - 1 if segs else 0
    report.last_hash = st.prev.hex() if segs and report.last_seq >= report.first_seq else ""
    report.checkpoints = len(cps)
    report.signed_seq = max((cp["seq"] for cp in cps), default=0)
    if st.problem is not None:
        report.problem = st.problem
        tail_from = max(report.signed_seq + 1, report.first_seq)
        if not archive and cps and tail_from < st.problem.seq and not chain_is_live(chain_dir):
            # unsigned records come first (a crash's tail, then its torn last line): that is the first bad position
            report.warnings.append(f"after the unsigned records: {st.problem}")
            report.problem = Problem(chain, tail_from, *locate(segs, tail_from),
                                     f"records {tail_from}..{report.last_seq} are not covered by a signed checkpoint "
                                     f"and no writer holds the chain; then, at seq {st.problem.seq}: "
                                     f"{st.problem.reason}")
        return report, seen_hashes
    anchor, purges = st.anchor, st.purges
    if archive and anchor is not None and purges.get(anchor[0] - 1) != anchor[1]:
        if not any(cp["seq"] == anchor[0] - 1 and cp.get("hash") == anchor[1] for cp in cps):
            report.warnings.append(f"the archive starts at seq {anchor[0]}: the records before it are not in "
                                   "this archive (an earlier export), nor is a seal or purge record for them")
    elif anchor is not None and purges.get(anchor[0] - 1) != anchor[1]:
        first_name = segs[0][1].name
        report.problem = Problem(chain, anchor[0], first_name, 1, 0,
                                 f"chain starts at seq {anchor[0]} but no audit.purge record accounts for the "
                                 "earlier segments (deleted)")
        return report, seen_hashes
    problem = _checkpoints_vs_log(chain, segs, cps, seen_hashes, report.first_seq, report.last_seq)
    if problem is not None:
        report.problem = problem
        return report, seen_hashes
    report.live = not archive and chain_is_live(chain_dir)
    tail_from = max(report.signed_seq + 1, report.first_seq)
    if report.last_seq < tail_from:
        return report, seen_hashes
    if archive:
        report.problem = Problem(chain, tail_from, *locate(segs, tail_from),
                                 f"records {tail_from}..{report.last_seq} are not covered by a signed checkpoint "
                                 "or seal in the archive (cut from its end, or appended)")
        return report, seen_hashes
    if not cps and st.signed_claim is None:
        report.warnings.append("no signed checkpoints: truncation of the tail and forged appends cannot be detected")
        return report, seen_hashes
    msg = f"records {tail_from}..{report.last_seq} are not covered by a signed checkpoint"
    if report.live:
        report.warnings.append(msg + " (writer running)")
        return report, seen_hashes
    if not cps:
        assert st.signed_claim is not None
        claim_seq, key_id = st.signed_claim
        msg += (f", but {CHECKPOINTS} is missing or empty while the record at seq {claim_seq} (audit.start) says "
                f"its writer signs checkpoints with key {key_id!r} (checkpoints deleted?)")
    else:
        msg += (" and no writer holds the chain: a forged append, or the unsigned tail of a crash; inspect it, "
                f"then `xcstack audit accept-tail --chain {chain} --through {report.last_seq}` if it is genuine")
    report.problem = Problem(chain, tail_from, *locate(segs, tail_from), msg)
    return report, seen_hashes


def _checkpoints_vs_log(chain: str, segs: list[tuple[int, Path]], cps: list[dict[str, Any]], seen: dict[int, str],
                        first_seq: int, last_seq: int) -> Problem | None:
    """The first checkpoint that names a record past the end or a different hash than the log's."""
    for cp in cps:
        seq = cp["seq"]
        if seq > last_seq:
            return Problem(chain, last_seq + 1, *locate(segs, last_seq + 1),
                           f"log truncated: signed checkpoint covers seq {seq}, log ends at seq {last_seq}")
        if seq >= first_seq and seen.get(seq) != cp["hash"]:
            return Problem(chain, seq, *locate(segs, seq), f"checkpoint for seq {seq} does not match the log")
    return None


def _scan_sequential(chain: str, segs: list[tuple[int, Path]], want: set[int]) -> _Scan:
    st = _Scan()
    expected = 0
    prev = rec.GENESIS
    loads = rec.loads
    check = rec.check
    for idx, (first, path) in enumerate(segs):
        name = path.name
        try:
            data = read_segment(path)
        except (OSError, EOFError, ValueError) as exc:  # a damaged .gz: CRC, truncation, bad header
            st.expected, st.prev = expected if idx else first, prev
            st.problem = Problem(chain, st.expected, name, 0, 0, f"segment unreadable: {exc}")
            return st
        if idx == 0:
            expected = first
            if first != 1:
                head = data[: data.find(b"\n")]
                try:
                    prev_hex = loads(head)["prev_hash"]
                    prev = bytes.fromhex(prev_hex)
                except Exception:
                    st.expected = first
                    st.problem = Problem(chain, first, name, 1, 0, "malformed first record")
                    return st
                st.anchor = (first, prev_hex)
        elif first != expected:
            st.expected, st.prev = expected, prev
            st.problem = Problem(chain, expected, name, 1, 0,
                                 f"segment starts at seq {first}, expected {expected} (segment deleted or renamed)")
            return st
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        base_seq = expected
        for i, line in enumerate(lines):
            digest = check(line, prev)
            seq = -1
            if digest is not None:
                # The hash covers the body, so seq and prev_hash are authentic once it matches; the
                # seq must still be the next one (a record re-chained by a forger recomputing hashes).
                seq_at = line.rfind(b'"seq":', -200)
                try:
                    seq = int(line[seq_at + 6 : line.find(b",", seq_at)])
                except ValueError:
                    seq = -1
            if digest is None or seq != expected:
                pos = sum(len(x) + 1 for x in lines[:i])
                if digest is None:
                    reason = _mismatch_reason(line, expected, prev)
                else:
                    reason = f"sequence break: expected seq {expected}, found {seq}"
                st.records += expected - base_seq
                st.expected, st.prev = expected, prev
                st.problem = Problem(chain, expected, name, i + 1, pos, reason)
                return st
            if seq in want:
                st.seen[seq] = digest.hex()
            if line.startswith(b'{"action":"audit.purge"'):
                with_detail = loads(line).get("detail") or {}
                if isinstance(with_detail.get("last_seq"), int):
                    st.purges[with_detail["last_seq"]] = str(with_detail.get("last_hash"))
            elif st.signed_claim is None and line.startswith(b'{"action":"audit.start"'):
                st.signed_claim = _claim(line, seq)
            prev = digest
            expected += 1
        st.records += expected - base_seq
        if torn:
            st.expected, st.prev = expected, prev
            st.problem = Problem(chain, expected, name, len(lines) + 1, len(data) - len(torn),
                                 "truncated record (no end of line)")
            return st
    st.expected, st.prev = expected, prev
    return st


def _claim(line: bytes, seq: int) -> tuple[int, str] | None:
    """(seq, key_id) when this audit.start record says its writer signs checkpoints."""
    key_id = (rec.loads(line).get("detail") or {}).get("key_id")
    return (seq, str(key_id)) if key_id else None


def locate(segs: list[tuple[int, Path]], seq: int) -> tuple[str, int, int]:
    """(segment, 1-based line, byte offset) where record `seq` is, or would be appended when it is
    past the end. Segment names give each file's first seq, so only one file is read."""
    if not segs:
        return "", 0, 0
    first, path = segs[0]
    for f, p in segs:
        if f <= seq:
            first, path = f, p
    try:
        data = read_segment(path)
    except (OSError, EOFError, ValueError):
        return path.name, 0, 0
    off = 0
    for _ in range(max(0, seq - first)):
        nl = data.find(b"\n", off)
        if nl < 0:
            break
        off = nl + 1
    line = data.count(b"\n", 0, off) + 1
    return path.name, line, off


def _mismatch_reason(line: bytes, expected: int, prev: bytes) -> str:
    reason = "record hash mismatch (modified record, or the previous record was changed)"
    try:
        obj = rec.loads(line)
        seq = obj.get("seq")
        if seq != expected:
            if isinstance(seq, int) and seq > expected:
                reason = f"sequence gap: expected seq {expected}, found {seq} (record deleted or reordered)"
            else:
                reason = f"sequence out of order: expected seq {expected}, found {seq} (reordered)"
        elif obj.get("prev_hash") != prev.hex():
            reason = "prev_hash does not match the previous record (deleted or reordered record)"
    except Exception:
        reason = "malformed record"
    return reason


def _chunks(segs: list[tuple[int, Path]]) -> list[tuple[str, int, int, bool]]:
    """(path, start, end, first chunk of its segment) byte ranges aligned to record starts."""
    out: list[tuple[str, int, int, bool]] = []
    for _, path in segs:
        if path.name.endswith(".gz"):  # compressed: one chunk, decompressed by its worker
            out.append((str(path), 0, -1, True))
            continue
        size = path.stat().st_size
        with open(path, "rb") as fh:
            start = 0
            while start < size:
                end = min(size, start + CHUNK_BYTES)
                if end < size:
                    fh.seek(end)
                    rest = fh.read(1 << 16)
                    nl = rest.find(b"\n")
                    end = size if nl < 0 else end + nl + 1
                out.append((str(path), start, end, start == 0))
                start = end
    return out


def _check_chunk(task: tuple[str, int, int, bool, frozenset[int]]) -> tuple[Any, ...] | None:
    """Verify one chunk on its own; None when anything is off (the caller rescans sequentially)."""
    path, start, end, _, want = task
    if end < 0:
        try:
            data = read_segment(Path(path))
        except (OSError, EOFError, ValueError):
            return None
    else:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
    if not data.endswith(b"\n"):
        return None
    lines = data[:-1].split(b"\n")
    first = rec.loads(lines[0])
    prev = bytes.fromhex(first["prev_hash"])
    first_prev = first["prev_hash"]
    seq0 = int(first["seq"])
    expected = seq0
    check = rec.check
    seen: dict[int, str] = {}
    purges: dict[int, str] = {}
    claim: tuple[int, str] | None = None
    for line in lines:
        digest = check(line, prev)
        if digest is None:
            return None
        seq_at = line.rfind(b'"seq":', -200)
        if int(line[seq_at + 6 : line.find(b",", seq_at)]) != expected:
            return None
        if expected in want:
            seen[expected] = digest.hex()
        if line.startswith(b'{"action":"audit.purge"'):
            d = rec.loads(line).get("detail") or {}
            if isinstance(d.get("last_seq"), int):
                purges[d["last_seq"]] = str(d.get("last_hash"))
        elif claim is None and line.startswith(b'{"action":"audit.start"'):
            claim = _claim(line, expected)
        prev = digest
        expected += 1
    return seq0, first_prev, expected, prev, seen, purges, claim


def _scan_parallel(segs: list[tuple[int, Path]], want: set[int], workers: int) -> _Scan | None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = _chunks(segs)
    first_of_seg = {str(p): first for first, p in segs}
    tasks = [(p, a, b, f, frozenset(want)) for p, a, b, f in chunks]
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_check_chunk, tasks))
    st = _Scan()
    for i, (task, res) in enumerate(zip(tasks, results, strict=True)):
        if res is None:
            return None
        seq0, first_prev, nxt, last, seen, purges, claim = res
        if task[3] and first_of_seg[task[0]] != seq0:
            return None
        if i == 0:
            if seq0 != 1:
                st.anchor = (seq0, first_prev)
            elif first_prev != rec.GENESIS.hex():
                return None
        elif seq0 != st.expected or first_prev != st.prev.hex():
            return None
        st.records += nxt - seq0
        st.expected, st.prev = nxt, last
        st.seen.update(seen)
        st.purges.update(purges)
        st.signed_claim = st.signed_claim or claim
    return st


def _read_seals(chain_dir: Path, report: ChainReport) -> list[dict[str, Any]]:
    """The seals of closed segments (`seg-N.seal`): signed checkpoints like those of checkpoints.log."""
    out: list[dict[str, Any]] = []
    for path in sorted(chain_dir.glob("seg-*" + SEAL_SUFFIX)) if chain_dir.is_dir() else ():
        try:
            cp = rec.loads(path.read_bytes())
            cp["seq"] = int(cp["seq"])
        except Exception:
            report.warnings.append(f"{path.name}: malformed (ignored)")
            continue
        cp["_file"], cp["_line"], cp["_offset"] = path.name, 1, 0
        out.append(cp)
    return out


def _read_checkpoints(path: Path, report: ChainReport) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    last = 0
    offset = 0
    for i, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        at, offset = offset, offset + len(line) + 1
        if not line:
            continue
        try:
            cp = rec.loads(line)
            cp["seq"] = int(cp["seq"])
        except Exception:
            report.warnings.append(f"checkpoints.log line {i}: malformed (ignored)")
            continue
        cp["_line"], cp["_offset"] = i, at  # where it is, for the problem's position
        if cp["seq"] < last:
            report.warnings.append(f"checkpoints.log line {i}: out of order")
        last = max(last, cp["seq"])
        out.append(cp)
    return out


async def verify_chain(chain_dir: Path, sig_verify: SigVerify | None = None, workers: int = 1,
                       archive: bool = False) -> ChainReport:
    """`workers` > 1 (or 0: all CPUs) allows the parallel scan for large chains. It starts processes
    with the spawn method, which re-imports the caller's `__main__`: the CLI uses it, the server
    does not (its verify runs sequentially in a thread). `archive`: an exported archive (see
    `verify_archive`)."""
    report, _ = await asyncio.to_thread(scan_chain, chain_dir, workers or None, archive)
    if sig_verify is not None:
        report.signatures_checked = True
        scratch = ChainReport(report.chain)
        for cp in _read_checkpoints(chain_dir / CHECKPOINTS, scratch) + _read_seals(chain_dir, scratch):
            msg = rec.checkpoint_message(cp["chain"], cp["seq"], cp["hash"], cp["ts"])
            try:
                sig = bytes.fromhex(cp["sig"])
            except (ValueError, TypeError, KeyError):
                sig = b""
            key_id = str(cp.get("key_id"))
            try:
                good = cp.get("chain") == report.chain and await sig_verify(key_id, msg, sig)
                reason = "SM2 signature invalid (forged or altered checkpoint)"
            except LookupError:
                good = False
                reason = f"no trusted public key for key id {key_id!r} (is the keystore / key file reachable?)"
            if not good:
                if report.problem is None or report.problem.seq > cp["seq"]:
                    report.problem = Problem(report.chain, cp["seq"], cp.get("_file", CHECKPOINTS), cp["_line"],
                                             cp["_offset"],
                                             f"checkpoint for seq {cp['seq']}: {reason}")
                break
    return report


async def verify_all(root: Path, sig_verify: SigVerify | None = None, workers: int = 1) -> list[ChainReport]:
    return [await verify_chain(d, sig_verify, workers) for d in list_chains(root)]


async def verify_archive(root: Path, sig_verify: SigVerify | None = None, workers: int = 1) -> list[ChainReport]:
    """Every chain of an exported archive directory, offline (public keys only)."""
    return [await verify_chain(d, sig_verify, workers, archive=True) for d in list_chains(root)]


@dataclass
class StartCheck:
    """What a writer learns before it takes a chain over (`start_scan`)."""

    problem: Problem | None = None
    last_cp: dict[str, Any] | None = None  # the checkpoint whose signature the caller must still check
    signed_seq: int = 0
    last_seq: int = 0  # after crash recovery's cut
    last_hash: str = ""
    verified_from: int = 0  # the first seq whose hash was recomputed
    tail: tuple[int, int] | None = None  # (first, last) seq of records no signed checkpoint covers
    tail_at: tuple[str, int, int] = ("", 0, 0)  # (segment, line, offset) of the tail's first record


def start_scan(chain_dir: Path, cut: dict[str, int], max_bytes: int, signing: bool) -> StartCheck:
    """The bounded check a writer runs before taking `chain_dir` over (blocking; the caller checks
    the last checkpoint's SM2 signature). `cut` maps segment names to the offset crash recovery
    would truncate them to (0: delete): a problem at or after it is a torn tail, not damage —
    unless a signed checkpoint covers it.

    Cost: the whole chain is hash-verified when it is at most `max_bytes`, else from the first
    record of the segment holding the last checkpoint. The signed (seq, hash) authenticates every
    record before it through the SM3 chain: an older record cannot be altered without the key
    unless the chain breaks there, and such a break in an older segment is left to `xcstack audit
    verify`. With `signing`, records after the last checkpoint are returned as `tail`."""
    chain = chain_dir.name
    out = StartCheck()
    cps = _read_checkpoints(chain_dir / CHECKPOINTS, ChainReport(chain)) + _read_seals(chain_dir, ChainReport(chain))
    segs = list_segments(chain_dir)
    last_cp = max(cps, key=lambda c: int(c["seq"])) if cps else None
    if not segs:
        if last_cp is not None:
            out.problem = Problem(chain, 1, "", 0, 0, f"log truncated: signed checkpoint covers seq {last_cp['seq']}, "
                                  "the chain has no segment files")
        return out
    scan = segs
    if last_cp is not None and sum(p.stat().st_size for _, p in segs) > max_bytes:
        scan = segs[max(i for i, (f, _) in enumerate(segs) if f <= last_cp["seq"] or i == 0):]
    st = _scan_sequential(chain, scan, {cp["seq"] for cp in cps})
    p = st.problem
    if p is not None and not (p.segment in cut and p.offset >= cut[p.segment]):
        out.problem = p
        return out
    last_seq = st.expected - 1
    out.verified_from, out.last_seq, out.last_hash = scan[0][0], last_seq, st.prev.hex()
    out.signed_seq = last_cp["seq"] if last_cp is not None else 0
    if p is not None and out.signed_seq > last_seq:  # "torn" records that a checkpoint signed: damage
        out.problem = Problem(chain, p.seq, p.segment, p.line, p.offset,
                              f"{p.reason}; the signed checkpoint at seq {out.signed_seq} covers it (not a crash "
                              "artefact)")
        return out
    if scan is segs and st.anchor is not None and st.purges.get(st.anchor[0] - 1) != st.anchor[1]:
        out.problem = Problem(chain, st.anchor[0], segs[0][1].name, 1, 0,
                              f"chain starts at seq {st.anchor[0]} but no audit.purge record accounts for the "
                              "earlier segments (deleted)")
        return out
    out.problem = _checkpoints_vs_log(chain, segs, cps, st.seen, scan[0][0], last_seq)
    if out.problem is not None:
        return out
    out.last_cp = last_cp
    tail_from = max(out.signed_seq + 1, segs[0][0])
    if signing and last_seq >= tail_from:
        out.tail = (tail_from, last_seq)
        out.tail_at = locate(segs, tail_from)
    return out
