"""Audit log: chaining, durability semantics, tamper matrix, torn tail recovery, rotation, retention."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from xcstack.security.audit import record as rec
from xcstack.security.audit.files import CHECKPOINTS, list_segments
from xcstack.security.audit.log import AuditLog, AuditUnavailable
from xcstack.security.audit.verify import verify_all, verify_chain
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import SoftSM2Signer

from .conftest import FakeClock


async def _sig(signer: SoftSM2Signer):  # type: ignore[no-untyped-def]
    async def check(key_id: str, msg: bytes, sig: bytes) -> bool:
        return key_id == signer.key_id and await signer.verify(msg, sig)

    return check


async def make_chain(root: Path, signer: SoftSM2Signer, n: int = 10) -> Path:
    log = AuditLog(root, AuditSettings(checkpoint_interval_s=3600), chain="c", signer=signer)
    await log.open()  # seq 1: audit.start
    for i in range(n):  # seq 2 .. n+1
        await log.append(actor="alice", action="api.call", resource=f"/v1/thing/{i}", outcome="success",
                         ip="10.0.0.1", request_id=f"r{i}")
    await log.close()  # seq n+2: audit.stop, then a final signed checkpoint
    return root / "c"


def seg_lines(chain: Path) -> tuple[Path, list[bytes]]:
    (_, path), = list_segments(chain)
    return path, path.read_bytes().splitlines(keepends=True)


async def test_chain_verifies_and_records_carry_fields(tmp_path: Path, signer: SoftSM2Signer) -> None:
    chain = await make_chain(tmp_path, signer)
    report = await verify_chain(chain, await _sig(signer))
    assert report.ok, report.problem
    assert (report.first_seq, report.last_seq, report.records) == (1, 12, 12)
    assert report.signatures_checked and report.signed_seq == 12
    _, lines = seg_lines(chain)
    obj = rec.loads(lines[1])
    for key in ("actor", "action", "resource", "outcome", "ip", "request_id", "ts", "seq", "prev_hash", "hash"):
        assert key in obj
    assert obj["ts"].endswith("Z")
    first = rec.loads(lines[0])
    assert first["prev_hash"] == "00" * 32 and obj["prev_hash"] == first["hash"]
    body = lines[1].rstrip(b"\n")[: -rec.HASH_SUFFIX_LEN] + b"}"
    assert rec.sm3(body + bytes.fromhex(obj["prev_hash"])).hex() == obj["hash"]
    # only the service user (and through the API only the auditor) can read the log
    assert oct(os.stat(chain).st_mode)[-3:] == "700" and oct(os.stat(chain.parent).st_mode)[-3:] == "700"
    for f in chain.iterdir():
        if f.is_file():
            assert oct(os.stat(f).st_mode)[-3:] == "600", f


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("case", ["flip", "flip_hash", "delete", "swap", "truncate", "torn", "forge_bad",
                                  "forge_valid", "rechain", "bad_signature", "delete_segment"])
async def test_tamper_matrix(tmp_path: Path, signer: SoftSM2Signer, case: str) -> None:
    chain = await make_chain(tmp_path, signer)
    path, lines = seg_lines(chain)
    expect_seq = 5
    if case == "flip":
        i = lines[4].index(b"/v1/thing/") + 3
        lines[4] = lines[4][:i] + bytes([lines[4][i] ^ 0x01]) + lines[4][i + 1 :]
    elif case == "flip_hash":
        i = len(lines[4]) - 10
        lines[4] = lines[4][:i] + (b"0" if lines[4][i:i + 1] != b"0" else b"1") + lines[4][i + 1 :]
    elif case == "delete":
        del lines[4]
    elif case == "swap":
        lines[4], lines[5] = lines[5], lines[4]
    elif case == "truncate":
        lines = lines[:9]  # seq 10..12 gone, cleanly at a record boundary
        expect_seq = 10
    elif case == "torn":
        lines[-1] = lines[-1][:40]
        expect_seq = 12
    elif case == "forge_bad":
        lines.append(lines[-1][:-20] + b'0000000000000000"}\n')
        expect_seq = 13
    elif case == "forge_valid":  # attacker computes a correct SM3 chain hash: only the checkpoint catches it
        last = rec.loads(lines[-1])
        forged = {"actor": "mallory", "action": "user.login", "resource": "user:mallory", "outcome": "success",
                  "seq": 13, "ts": last["ts"], "chain": "c"}
        line, _ = rec.encode(forged, bytes.fromhex(last["hash"]))
        lines.append(line)
        expect_seq = 13
    elif case == "rechain":  # modify seq 5 and recompute every later hash: the signed checkpoint disagrees
        prev = bytes.fromhex(rec.loads(lines[3])["hash"])
        for i in range(4, len(lines)):
            obj = rec.loads(lines[i])
            obj.pop("hash")
            if i == 4:
                obj["outcome"] = "failure"
            lines[i], prev = rec.encode(obj, prev)
        expect_seq = 12
    elif case == "bad_signature":
        cps = (chain / CHECKPOINTS).read_bytes().splitlines(keepends=True)
        obj = rec.loads(cps[-1])
        obj["sig"] = obj["sig"][:-4] + ("0000" if obj["sig"][-4:] != "0000" else "1111")
        cps[-1] = rec.canonical(obj) + b"\n"
        (chain / CHECKPOINTS).write_bytes(b"".join(cps))
        expect_seq = 12
    elif case == "delete_segment":
        # split the segment in two files, then delete the first: the chain now starts without a purge record
        _head, tail = lines[:6], lines[6:]
        (chain / "seg-000000000007.log").write_bytes(b"".join(tail))
        path.unlink()
        lines = None  # type: ignore[assignment]
        expect_seq = 7
    if lines is not None:
        _rewrite(path, lines)
    report = await verify_chain(chain, await _sig(signer))
    assert not report.ok, case
    assert report.problem is not None
    assert report.problem.seq == expect_seq, str(report.problem)
    assert f"seq {expect_seq}" in str(report.problem)


async def test_torn_tail_truncated_at_restart_with_audit_event(tmp_path: Path, signer: SoftSM2Signer) -> None:
    chain = await make_chain(tmp_path, signer, n=3)
    path, lines = seg_lines(chain)
    with open(path, "ab") as fh:  # noqa: ASYNC230
        fh.write(lines[-1][:30])  # a half-written record, as a kill -9 / power cut during write leaves
    log = AuditLog(tmp_path, AuditSettings(), chain="c", signer=signer)
    await log.open()
    await log.close()
    report = await verify_chain(chain, await _sig(signer))
    assert report.ok, report.problem
    data = b"".join(p.read_bytes() for _, p in list_segments(chain))
    events = [rec.loads(x) for x in data.splitlines()]
    recovered = [e for e in events if e["action"] == "audit.recovered"]
    assert len(recovered) == 1
    assert recovered[0]["detail"]["truncated_bytes"] == 30
    assert recovered[0]["detail"]["last_good_seq"] == 5


async def test_group_commit_many_concurrent_writers(tmp_path: Path, signer: SoftSM2Signer) -> None:
    from xcstack.security.audit.log import AUDIT_COMMITS, AUDIT_RECORDS

    log = AuditLog(tmp_path, AuditSettings(), chain="g", signer=signer)
    await log.open()
    r0, c0 = AUDIT_RECORDS._value.get(), AUDIT_COMMITS._value.get()
    seqs = await asyncio.gather(*[
        log.append(actor=f"u{i}", action="api.call", resource="/x", outcome="success") for i in range(2000)
    ])
    records, commits = AUDIT_RECORDS._value.get() - r0, AUDIT_COMMITS._value.get() - c0
    assert records == 2000 and commits < 100  # group commit: many records per fdatasync
    assert sorted(seqs) == list(range(2, 2002))
    assert len(set(seqs)) == 2000
    await log.close()
    (report,) = await verify_all(tmp_path, await _sig(signer))
    assert report.ok and report.last_seq == 2002


async def test_two_writers_take_separate_chains(tmp_path: Path) -> None:
    a = AuditLog(tmp_path, AuditSettings(node="n"))
    b = AuditLog(tmp_path, AuditSettings(node="n"))
    await a.open()
    await b.open()
    assert {a.chain, b.chain} == {"n-0", "n-1"}
    with pytest.raises(RuntimeError):
        c = AuditLog(tmp_path, AuditSettings(node="n"), chain="n-0")
        c.open_blocking()
    await a.append(actor="x", action="y", resource="z", outcome="success")
    await a.close()
    await b.close()
    reports = await verify_all(tmp_path)
    assert [r.ok for r in reports] == [True, True]


async def test_rotation_by_size_and_verify_across_segments(tmp_path: Path, signer: SoftSM2Signer) -> None:
    log = AuditLog(tmp_path, AuditSettings(segment_max_bytes=4096), chain="r", signer=signer)
    await log.open()
    for i in range(100):
        await log.append(actor="u", action="api.call", resource=f"/r/{i}", outcome="success")
    await log.close()
    segs = list_segments(tmp_path / "r")
    assert len(segs) > 3
    report = await verify_chain(tmp_path / "r", await _sig(signer))
    assert report.ok, report.problem
    assert report.last_seq == 102


async def test_rotation_by_time_and_retention_purge(tmp_path: Path, signer: SoftSM2Signer, clock: FakeClock) -> None:
    settings = AuditSettings(rotate_interval_s=86400, retention_days=180)
    log = AuditLog(tmp_path, settings, chain="p", signer=signer, clock=clock)
    await log.open()
    for _day in range(3):
        for _ in range(5):
            await log.append(actor="u", action="api.call", resource="/r", outcome="success")
        clock.advance(86400)
    assert len(list_segments(tmp_path / "p")) == 3
    assert await log.purge_expired() == []  # nothing is 180 days old yet
    clock.advance(181 * 86400)
    await log.append(actor="u", action="api.call", resource="/r", outcome="success")  # opens a new segment
    purged = await log.purge_expired()
    assert len(purged) == 3
    await log.close()
    report = await verify_chain(tmp_path / "p", await _sig(signer))
    assert report.ok, report.problem
    assert report.first_seq > 1


def test_retention_below_180_days_rejected() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="retention_days"):
        AuditSettings(retention_days=30)


async def test_write_failure_fails_the_caller_closed(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, AuditSettings(), chain="f")
    await log.open()
    assert log._fd is not None
    os.close(log._fd)
    log._fd = os.open(os.devnull, os.O_RDONLY)  # every write now fails with EBADF
    with pytest.raises(AuditUnavailable) as exc:
        await log.append(actor="u", action="api.call", resource="/r", outcome="success")
    assert exc.value.status == 503 and exc.value.code == "audit_unavailable"
    log.close_blocking()


async def test_append_blocking_from_sync_code(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, AuditSettings(), chain="s")
    await asyncio.to_thread(log.open_blocking)
    seq = await asyncio.to_thread(lambda: log.append_blocking(actor="sup", action="trust.verify",
                                                              resource="trust", outcome="failure"))
    assert seq == 1
    log.close_blocking()
    assert (await verify_chain(tmp_path / "s")).ok


async def test_queue_bound_rejects_fast(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, AuditSettings(max_pending=16), chain="q")
    await asyncio.to_thread(log.open_blocking)
    with log._cond:  # hold the writer so the queue fills
        for _ in range(16):
            log._pending.append(None)  # type: ignore[arg-type]
        with pytest.raises(AuditUnavailable):
            log._enqueue(None)  # type: ignore[arg-type]
        log._pending.clear()
    log.close_blocking()


async def test_parallel_verify_matches_sequential(tmp_path: Path, signer: SoftSM2Signer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from xcstack.security.audit import verify as v

    log = AuditLog(tmp_path, AuditSettings(segment_max_bytes=16384), chain="pv", signer=signer)
    await log.open()
    await asyncio.gather(*[log.append(actor="u", action="api.call", resource=f"/p/{i}", outcome="success")
                           for i in range(400)])
    await log.close()
    seq_report, seq_seen = v.scan_chain(tmp_path / "pv", workers=1)
    monkeypatch.setattr(v, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(v, "CHUNK_BYTES", 5000)
    called = []
    real = v._scan_parallel

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        out = real(*a, **k)
        called.append(out is not None)
        return out

    monkeypatch.setattr(v, "_scan_parallel", spy)
    par_report, par_seen = v.scan_chain(tmp_path / "pv", workers=2)
    assert called == [True]
    assert par_report.to_dict() == seq_report.to_dict() and par_seen == seq_seen and par_report.ok
    # tampering in a middle chunk: the parallel pass gives up, the sequential pass names the record
    segs = list_segments(tmp_path / "pv")
    _, path = segs[len(segs) // 2]
    lines = path.read_bytes().splitlines(keepends=True)
    bad_seq = rec.loads(lines[3])["seq"]
    lines[3] = lines[3].replace(b'"outcome":"success"', b'"outcome":"failure"')
    path.write_bytes(b"".join(lines))
    report, _ = v.scan_chain(tmp_path / "pv", workers=2)
    assert called == [True, False]
    assert report.problem is not None and report.problem.seq == bad_seq


def test_fast_sm3_path_equals_the_crypto_adapter() -> None:
    from xcstack.crypto.recipes import sm3

    prev = bytes(range(32))
    line, digest = rec.encode({"actor": "a", "action": "b", "seq": 1}, prev)
    body = line.rstrip(b"\n")[: -rec.HASH_SUFFIX_LEN] + b"}"
    assert digest == sm3(body + prev)
    assert rec.check(line.rstrip(b"\n"), prev) == digest
    assert rec.check(line.rstrip(b"\n"), bytes(32)) is None
    # GB/T 32905 test vector through the same path
    assert rec._BASE.copy().finalize() == sm3(b"")
    h = rec._BASE.copy()
    h.update(b"abc")
    assert h.finalize().hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"


async def test_bad_or_huge_detail_never_fails_the_batch(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, AuditSettings(), chain="d")
    await log.open()
    seqs = await asyncio.gather(
        log.append(actor="u", action="a", resource="r", outcome="success", detail={"x": object()}),
        log.append(actor="u", action="a", resource="r", outcome="success", detail={"big": "y" * 200_000}),
        log.append(actor="u", action="a", resource="r", outcome="success", detail={"ok": 1}),
    )
    await log.close()
    assert len(set(seqs)) == 3
    recs = {r["seq"]: r for _, p in list_segments(tmp_path / "d") for r in map(rec.loads, p.read_bytes().splitlines())}
    assert "unserializable" in recs[seqs[0]]["detail"]
    assert recs[seqs[1]]["detail"] == {"truncated": True, "size": recs[seqs[1]]["detail"]["size"]}
    assert recs[seqs[2]]["detail"] == {"ok": 1}
    assert (await verify_chain(tmp_path / "d")).ok
