"""Audit retention and archival (issue 15 item 5): closed segments are sealed (SM2-signed checkpoint
of their last record) and compressed; they export to an archive that verifies offline; retention
prunes them with an audited record and what remains still verifies from its anchor."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from xcstack.security.audit import record as rec
from xcstack.security.audit.archive import export_chain
from xcstack.security.audit.files import list_segments, read_segment, seal_path
from xcstack.security.audit.log import AuditLog
from xcstack.security.audit.verify import verify_archive, verify_chain
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import SoftSM2Signer

from .conftest import FakeClock


def _sig(signer: SoftSM2Signer) -> Any:
    async def check(key_id: str, msg: bytes, sig: bytes) -> bool:
        if key_id != signer.key_id:
            raise LookupError(key_id)
        return await signer.verify(msg, sig)

    return check


async def _calls(log: AuditLog, n: int, tag: str = "") -> None:
    for i in range(n):
        await log.append(actor="alice", action="api.call", resource=f"route:/v1/chat/completions{tag}",
                         outcome="success", ip="10.0.0.7", request_id=f"{tag}{i:032x}",
                         detail={"method": "POST", "status": 200})


def _records(chain: Path) -> list[dict[str, Any]]:
    return [rec.loads(x) for _, p in list_segments(chain) for x in read_segment(p).splitlines()]


async def _rotated_chain(root: Path, signer: SoftSM2Signer, n: int = 120) -> AuditLog:
    log = AuditLog(root, AuditSettings(segment_max_bytes=8192, checkpoint_interval_s=3600), chain="a",
                   signer=signer)
    await log.open()
    await _calls(log, n)
    return log


async def test_closed_segments_are_sealed_and_compressed(tmp_path: Path, signer: SoftSM2Signer) -> None:
    log = await _rotated_chain(tmp_path, signer)
    before = {p.name: p.stat().st_size for _, p in list_segments(log.dir)}
    plain = b"".join(p.read_bytes() for _, p in list_segments(log.dir))
    compressed = await log.archive()
    segs = list_segments(log.dir)
    assert len(segs) >= 4 and compressed == [n for n in sorted(before) if n != segs[-1][1].name]
    for _, p in segs[:-1]:
        assert p.name.endswith(".log.gz") and seal_path(p).exists()
        assert oct(p.stat().st_mode)[-3:] == "600" and oct(seal_path(p).stat().st_mode)[-3:] == "600"
        seal = rec.loads(seal_path(p).read_bytes())
        last = rec.loads(read_segment(p).splitlines()[-1])
        assert (seal["seq"], seal["hash"], seal["chain"]) == (last["seq"], last["hash"], "a")
    assert segs[-1][1].name.endswith(".log") and not seal_path(segs[-1][1]).exists()  # the open segment
    assert b"".join(read_segment(p) for _, p in segs) == plain  # nothing changed but the encoding
    ratio = sum(before[p.name.removesuffix(".gz")] for _, p in segs[:-1]) / sum(p.stat().st_size
                                                                                for _, p in segs[:-1])
    assert ratio > 3, ratio
    assert await log.archive() == []  # idempotent
    report = await verify_chain(log.dir, _sig(signer))
    assert report.ok and report.signatures_checked, report.problem
    await log.close()
    # a restart verifies compressed segments at start, then appends and seals on
    log = AuditLog(tmp_path, AuditSettings(segment_max_bytes=8192, checkpoint_interval_s=3600), chain="a",
                   signer=signer)
    await log.open()
    await _calls(log, 60, "b")
    await log.archive()
    await log.close()
    report = await verify_chain(log.dir, _sig(signer))
    assert report.ok, report.problem
    assert [r["seq"] for r in _records(log.dir)] == list(range(1, report.last_seq + 1))


async def test_segments_closed_by_an_earlier_process_are_sealed_after_the_start_check(
    tmp_path: Path, signer: SoftSM2Signer
) -> None:
    log = await _rotated_chain(tmp_path, signer)
    await log.close()  # closed segments never sealed by this writer (no archive() call)
    log = AuditLog(tmp_path, AuditSettings(segment_max_bytes=8192), chain="a", signer=signer)
    await log.open()
    assert await log.archive()
    assert all(seal_path(p).exists() for _, p in list_segments(log.dir)[:-1])
    await log.close()
    assert (await verify_chain(log.dir, _sig(signer))).ok


async def test_damage_in_compressed_segments_and_seals_is_found(tmp_path: Path, signer: SoftSM2Signer) -> None:
    log = await _rotated_chain(tmp_path, signer)
    await log.archive()
    await log.close()
    segs = list_segments(log.dir)
    victim = segs[1][1]
    original = victim.read_bytes()
    lines = gzip.decompress(original).splitlines(keepends=True)
    first_seq = rec.loads(lines[0])["seq"]
    lines[2] = lines[2].replace(b'"outcome":"success"', b'"outcome":"failure"')
    victim.write_bytes(gzip.compress(b"".join(lines)))
    p = (await verify_chain(log.dir, _sig(signer))).problem
    assert p is not None and (p.seq, p.segment, p.line) == (first_seq + 2, victim.name, 3), p
    victim.write_bytes(original[:-9])  # a truncated .gz
    p = (await verify_chain(log.dir, _sig(signer))).problem
    assert p is not None and p.segment == victim.name and "unreadable" in p.reason, p
    victim.write_bytes(original)
    seal = seal_path(victim)
    good = seal.read_bytes()
    forged = rec.loads(good)
    forged["ts"] = "2020-01-01T00:00:00.000000Z"
    seal.write_bytes(rec.canonical(forged) + b"\n")
    p = (await verify_chain(log.dir, _sig(signer))).problem
    assert p is not None and p.segment == seal.name and "signature invalid" in p.reason, p
    seal.write_bytes(good)
    assert (await verify_chain(log.dir, _sig(signer))).ok


async def test_export_verifies_offline_and_finds_tampering(tmp_path: Path, signer: SoftSM2Signer) -> None:
    log = await _rotated_chain(tmp_path / "live", signer)
    await log.archive()
    dest = tmp_path / "archive"
    first = export_chain(log.dir, dest)
    assert first.copied and first.last_seq > 0
    await _calls(log, 80, "more")
    await log.archive()
    second = export_chain(log.dir, dest)  # incremental
    assert second.kept == len([n for n in first.copied if n.startswith("seg-")]) and second.last_seq > first.last_seq
    await log.close()
    (report,) = await verify_archive(dest, _sig(signer))
    assert report.ok and report.signatures_checked and report.last_seq == second.last_seq, report.problem
    assert report.first_seq == 1 and not report.warnings
    arch = dest / "a"
    segs = list_segments(arch)
    # a segment deleted from the middle
    mid = segs[2][1]
    data = mid.read_bytes()
    mid.unlink()
    (r,) = await verify_archive(dest, _sig(signer))
    assert r.problem is not None and "segment starts at seq" in r.problem.reason, r.problem
    mid.write_bytes(data)
    # the newest segment and its seal cut off: the exported checkpoints name records past the end
    last = segs[-1][1]
    kept = last.read_bytes(), seal_path(last).read_bytes()
    last.unlink()
    seal_path(last).unlink()
    (r,) = await verify_archive(dest, _sig(signer))
    assert r.problem is not None and "truncated" in r.problem.reason, r.problem
    last.write_bytes(kept[0])
    seal_path(last).write_bytes(kept[1])
    # a record appended to the archive, correctly chained: no signature in the archive covers it
    lines = gzip.decompress(kept[0]).splitlines(keepends=True)
    tail = rec.loads(lines[-1])
    forged = {k: v for k, v in tail.items() if k not in ("hash", "prev_hash")}
    forged["seq"] = tail["seq"] + 1
    line, _ = rec.encode(forged, bytes.fromhex(tail["hash"]))
    last.write_bytes(gzip.compress(b"".join(lines) + line))
    (r,) = await verify_archive(dest, _sig(signer))
    assert r.problem is not None and "not covered by a signed checkpoint or seal" in r.problem.reason, r.problem
    assert r.problem.seq == tail["seq"] + 1
    last.write_bytes(kept[0])
    # no trusted key: the signatures cannot be checked, which is a failure, not a pass
    other = SoftSM2Signer("other")
    (r,) = await verify_archive(dest, _sig(other))
    assert r.problem is not None and "no trusted public key" in r.problem.reason
    assert all(x.ok for x in await verify_archive(dest, _sig(signer)))


async def test_retention_prunes_audited_and_what_remains_verifies(tmp_path: Path, signer: SoftSM2Signer,
                                                                 clock: FakeClock) -> None:
    settings = AuditSettings(rotate_interval_s=86400, retention_days=180, checkpoint_interval_s=3600)
    log = AuditLog(tmp_path / "live", settings, chain="p", signer=signer, clock=clock)
    await log.open()
    for day in range(3):
        await _calls(log, 5, f"d{day}-")
        clock.advance(86400)
    await _calls(log, 1, "d3-")  # rotates: the third day's segment is closed too
    assert await log.archive()
    export_chain(log.dir, tmp_path / "archive")
    clock.advance(181 * 86400)
    await _calls(log, 1, "late-")  # rotates again
    await log.archive()
    purged = await log.purge_expired()
    assert len(purged) == 4 and all(n.endswith(".log.gz") for n in purged)
    assert not [p for p in log.dir.iterdir() if p.name.endswith(".seal") and
                p.name.split(".")[0] + ".log.gz" in purged]
    recs = _records(log.dir)
    purges = [r for r in recs if r["action"] == "audit.purge"]
    assert [r["detail"]["segment"] for r in purges] == purged  # each deletion is itself audited
    await log.close()
    live = await verify_chain(log.dir, _sig(signer))
    assert live.ok and live.first_seq > 1, live.problem
    # the remaining chain restarts from the last purged record: its prev_hash is the anchor the
    # signed audit.purge record names
    first = rec.loads(read_segment(list_segments(log.dir)[0][1]).splitlines()[0])
    assert first["prev_hash"] == purges[-1]["detail"]["last_hash"]
    # the archive made before the prune still verifies on its own
    (arch,) = await verify_archive(tmp_path / "archive", _sig(signer))
    assert arch.ok and arch.first_seq == 1, arch.problem
    # a restart over the pruned, compressed chain passes the start check
    log = AuditLog(tmp_path / "live", settings, chain="p", signer=signer, clock=clock)
    await log.open()
    await log.close()
    assert (await verify_chain(log.dir, _sig(signer))).ok


async def test_records_api_reads_compressed_segments(tmp_path: Path, signer: SoftSM2Signer) -> None:
    from xcstack.security import protocol as p
    from xcstack.security.routes import read_records

    log = await _rotated_chain(tmp_path, signer)
    assert await log.archive()
    await log.close()
    page = read_records(tmp_path, p.AuditQuery(chain="a", limit=1000))
    last = (await verify_chain(log.dir)).last_seq
    assert [r["seq"] for r in page["records"]] == list(range(1, last + 1))
    merged = read_records(tmp_path, p.AuditQuery(limit=1000))
    assert len(merged["records"]) == last


async def test_cli_export_verify_archive_and_prune(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    import asyncio

    from xcstack.config import load_settings
    from xcstack.security.keys import local_signer

    from .test_audit_integrity import _acli

    data = tmp_path / "data"
    monkeypatch.setenv("XC_DATA_DIR", str(data))
    monkeypatch.setenv("XC_CRYPTO__ENABLED", "false")
    signer = local_signer(data, load_settings(None).security.signing_key)
    clock = FakeClock(__import__("time").time() - 200 * 86400)  # records written 200 days ago
    log = AuditLog(data / "audit", AuditSettings(segment_max_bytes=8192, checkpoint_interval_s=3600), chain="n",
                   signer=signer, clock=clock)
    await log.open()
    await _calls(log, 60)  # 200 days old: past retention
    clock.advance(199 * 86400)
    await _calls(log, 60, "recent")  # yesterday's: kept
    await log.close()  # closed segments left unsealed: the CLI's prune seals them (start-verified)
    dest = tmp_path / "arch"
    assert await _acli("audit", "export", "--archive", str(dest)) == 0
    assert "archive holds seq ..0" in capsys.readouterr().out  # nothing sealed yet
    assert await _acli("audit", "prune") == 0
    out = capsys.readouterr().out
    assert "segments pruned (seg-" in out, out
    await asyncio.sleep(0)
    assert await _acli("audit", "verify") == 0
    purges = [r for r in _records(data / "audit" / "n") if r["action"] == "audit.purge"]
    assert purges and str(purges[0]["actor"]) == "system"
    assert await _acli("audit", "export", "--archive", str(dest)) == 0
    assert await _acli("audit", "verify", "--archive", str(dest)) == 0
    assert "OK  chain n" in capsys.readouterr().out
    seg = list_segments(dest / "n")[0][1]
    seg.write_bytes(seg.read_bytes()[:-20])
    assert await _acli("audit", "verify", "--archive", str(dest)) == 1
