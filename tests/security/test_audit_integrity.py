"""The audit start-up rule (issue 12, finding 2): a writer never signs over records it has not
verified. Forged appends, a deleted checkpoints.log, damage in the middle and a tampered signed
tail are refused at start (or, configured, left read-only with an alert); `audit verify` fails on a
missing checkpoints.log and names the right positions; `audit accept-tail` is the operator's
audited way past a crash's unsigned tail."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from xcstack.security import cli as sec_cli
from xcstack.security.audit import record as rec
from xcstack.security.audit.files import CHECKPOINTS, list_segments
from xcstack.security.audit.log import AUDIT_INTEGRITY, AuditIntegrityError, AuditLog
from xcstack.security.audit.verify import ChainReport, verify_chain
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import SoftSM2Signer

from .conftest import audit_records


def _sig(signer: SoftSM2Signer):  # type: ignore[no-untyped-def]
    async def check(key_id: str, msg: bytes, sig: bytes) -> bool:
        if key_id != signer.key_id:
            raise LookupError(key_id)
        return await signer.verify(msg, sig)

    return check


async def make_chain(root: Path, signer: SoftSM2Signer, n: int = 10, name: str = "c") -> Path:
    """seq 1 audit.start, 2..n+1 api.call, n+2 audit.stop; signed checkpoints at 1 and n+2."""
    log = AuditLog(root, AuditSettings(checkpoint_interval_s=3600), chain=name, signer=signer)
    await log.open()
    for i in range(n):
        await log.append(actor="alice", action="api.call", resource=f"/v1/thing/{i}", outcome="success")
    await log.close()
    return root / name


def _files(chain: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(chain.iterdir()) if p.is_file() and p.name != ".lock"}


def _forge(chain: Path) -> None:
    """Append a well-formed record with a correct SM3 chain hash, as someone with file access can."""
    (_, path), = list_segments(chain)
    last = rec.loads(path.read_bytes().splitlines()[-1])
    forged = {"actor": "mallory", "action": "user.login", "resource": "user:mallory", "outcome": "success",
              "seq": last["seq"] + 1, "ts": last["ts"], "chain": chain.name}
    line, _ = rec.encode(forged, bytes.fromhex(last["hash"]))
    with open(path, "ab") as fh:
        fh.write(line)


def _flip(chain: Path, seq: int) -> None:
    (_, path), = list_segments(chain)
    lines = path.read_bytes().splitlines(keepends=True)
    i = lines[seq - 1].index(b'"outcome":"') + 11
    lines[seq - 1] = lines[seq - 1][:i] + b"X" + lines[seq - 1][i + 1 :]
    path.write_bytes(b"".join(lines))


def _where(chain: Path, seq: int) -> tuple[str, int, int]:
    """(segment, line, byte offset) of record `seq` (or of the end, when past it), read independently."""
    (_, path), = list_segments(chain)
    lines = path.read_bytes().splitlines(keepends=True)
    return path.name, seq, sum(len(x) for x in lines[: seq - 1])


async def _refused(root: Path, signer: SoftSM2Signer, **settings: object) -> AuditIntegrityError:
    before = _files(root / "c")
    with pytest.raises(AuditIntegrityError) as exc:
        await AuditLog(root, AuditSettings(**settings), chain="c", signer=signer).open()  # type: ignore[arg-type]
    assert _files(root / "c") == before  # nothing appended, truncated or signed
    return exc.value


# -- (a) a forged append while the server is stopped ---------------------------------------------
async def test_forged_append_refused_at_start_and_reported_by_verify(tmp_path: Path, signer: SoftSM2Signer) -> None:
    chain = await make_chain(tmp_path, signer)
    _forge(chain)
    p = (await _refused(tmp_path, signer)).problem
    assert (p.chain, p.seq, (p.segment, p.line, p.offset)) == ("c", 13, _where(chain, 13))
    assert "records 13..13 are not covered by a signed checkpoint" in p.reason
    assert "xcstack audit accept-tail --chain c --through 13" in p.reason
    report = await verify_chain(chain, _sig(signer))
    assert report.problem is not None and (report.problem.seq, report.problem.line) == (13, 13)
    assert (report.records, report.last_seq, report.signed_seq, report.checkpoints) == (13, 13, 12, 2)


async def test_forged_append_read_only_mode_alerts_on_a_fresh_chain(tmp_path: Path, signer: SoftSM2Signer) -> None:
    chain = await make_chain(tmp_path, signer)
    _forge(chain)
    before = _files(chain)
    count = AUDIT_INTEGRITY.labels("read_only")._value.get()
    log = AuditLog(tmp_path, AuditSettings(on_integrity_failure="read_only"), chain="c", signer=signer)
    await log.open()
    await log.append(actor="bob", action="api.call", resource="/x", outcome="success")
    await log.close()
    assert log.chain == "c.1" and [p.seq for p in log.integrity_failures] == [13]
    assert AUDIT_INTEGRITY.labels("read_only")._value.get() == count + 1
    assert _files(chain) == before  # the failed chain is left exactly as found: never appended to or signed
    fresh = [r for r in audit_records(tmp_path) if r["chain"] == "c.1"]
    assert [r["action"] for r in fresh[:2]] == ["audit.integrity_failure", "audit.start"]
    detail = fresh[0]["detail"]
    assert isinstance(detail, dict) and (detail["chain"], detail["seq"], detail["line"]) == ("c", 13, 13)
    assert (await verify_chain(tmp_path / "c.1", _sig(signer))).ok
    assert not (await verify_chain(chain, _sig(signer))).ok


# -- (b) checkpoints.log deleted --------------------------------------------------------------------
def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="xcstack")
    p.add_argument("--config", "-c", default=None)
    sec_cli.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(list(argv))
    return int(args.func(args))


async def _acli(*argv: str) -> int:
    """The CLI runs its own event loop: call it from a thread."""
    return await asyncio.to_thread(_cli, *argv)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
async def test_missing_checkpoints_fail_verify_and_start(tmp_path: Path, signer: SoftSM2Signer, how: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XC_CRYPTO__ENABLED", "false")
    chain = await make_chain(tmp_path / "audit", signer)
    if how == "deleted":
        (chain / CHECKPOINTS).unlink()
    else:
        (chain / CHECKPOINTS).write_bytes(b"")
    assert await _acli("audit", "verify", "--dir", str(tmp_path / "audit"), "--no-signatures") == 1
    out = capsys.readouterr().out
    assert "BAD chain c" in out and "checkpoints.log is missing or empty" in out and "seq 1" in out
    assert await _acli("audit", "verify", "--dir", str(tmp_path / "audit")) == 1
    report = await verify_chain(chain)
    assert report.problem is not None and (report.problem.seq, report.problem.line, report.problem.offset) == (1, 1, 0)
    assert "'test-sm2'" in report.problem.reason  # the key the audit.start record names
    p = (await _refused(tmp_path / "audit", signer)).problem
    assert p.seq == 1 and "records 1..12 are not covered" in p.reason


# -- (c) damage in the middle -------------------------------------------------------------------------
async def test_damage_in_the_middle_refuses_start_with_position(tmp_path: Path, signer: SoftSM2Signer) -> None:
    chain = await make_chain(tmp_path, signer)
    _flip(chain, 5)
    p = (await _refused(tmp_path, signer)).problem
    assert (p.seq, (p.segment, p.line, p.offset)) == (5, _where(chain, 5)) and "hash mismatch" in p.reason
    assert "first bad record at seq 5, seg-000000000001.log line 5" in str(AuditIntegrityError(p))
    # read_only: started on a fresh chain, the damaged one named in its first record
    log = AuditLog(tmp_path, AuditSettings(on_integrity_failure="read_only"), chain="c", signer=signer)
    await log.open()
    await log.close()
    assert log.chain == "c.1" and log.integrity_failures[0].seq == 5


async def test_tampered_signed_last_record_is_not_cut_as_a_torn_tail(tmp_path: Path, signer: SoftSM2Signer) -> None:
    """Crash recovery truncates a tail that does not verify; a record a signed checkpoint covers is
    never such a tail (before: it was cut, and the start signed over what was left)."""
    chain = await make_chain(tmp_path, signer)
    _flip(chain, 12)  # audit.stop, covered by the close's checkpoint
    p = (await _refused(tmp_path, signer)).problem
    assert (p.seq, p.line) == (12, 12) and "signed checkpoint at seq 12 covers it" in p.reason


async def test_bad_last_checkpoint_signature_refuses_start(tmp_path: Path, signer: SoftSM2Signer) -> None:
    chain = await make_chain(tmp_path, signer)
    cps = (chain / CHECKPOINTS).read_bytes().splitlines(keepends=True)
    other = SoftSM2Signer(signer.key_id)  # same key id, another key: a forger's signature
    obj = rec.loads(cps[-1])
    obj["sig"] = (await other.sign(rec.checkpoint_message("c", obj["seq"], obj["hash"], obj["ts"]))).hex()
    (chain / CHECKPOINTS).write_bytes(cps[0] + rec.canonical(obj) + b"\n")
    p = (await _refused(tmp_path, signer)).problem
    assert (p.seq, p.segment, p.line, p.offset) == (12, CHECKPOINTS, 2, len(cps[0]))
    assert "SM2 signature invalid" in p.reason


async def test_start_verification_is_bounded_by_the_anchor_segment(tmp_path: Path, signer: SoftSM2Signer) -> None:
    """Above startup_verify_max_bytes only the segment holding the last checkpoint (and later) is
    re-hashed; below it, everything."""
    log = AuditLog(tmp_path, AuditSettings(segment_max_bytes=4096, checkpoint_interval_s=3600), chain="c",
                   signer=signer)
    await log.open()
    for i in range(60):
        await log.append(actor="u", action="api.call", resource=f"/r/{i}", outcome="success")
    await log.close()
    segs = list_segments(tmp_path / "c")
    assert len(segs) > 3
    first = segs[0][1]
    lines = first.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"outcome":"success"', b'"outcome":"failure"')
    first.write_bytes(b"".join(lines))
    p = (await _refused(tmp_path, signer)).problem  # default budget (128 MiB): the whole chain
    assert (p.seq, p.segment, p.line) == (3, first.name, 3)
    bounded = AuditLog(tmp_path, AuditSettings(startup_verify_max_bytes=0), chain="c", signer=signer)
    await bounded.open()  # older segments are left to `xcstack audit verify`, which still names the damage
    await bounded.close()
    report = await verify_chain(tmp_path / "c", _sig(signer))
    assert report.problem is not None and report.problem.seq == 3
    # damage in the anchor segment is found even with no budget
    last = list_segments(tmp_path / "c")[-1][1]
    data = last.read_bytes()
    last.write_bytes(data.replace(b'"actor":"system"', b'"actor":"systen"', 1))
    with pytest.raises(AuditIntegrityError) as exc:
        await AuditLog(tmp_path, AuditSettings(startup_verify_max_bytes=0), chain="c", signer=signer).open()
    assert exc.value.problem.segment == last.name


# -- (d) summary and positions in every failure case -----------------------------------------------------
@pytest.mark.parametrize("case", ["flip", "truncate", "forge", "rechain", "bad_signature", "no_checkpoints"])
async def test_verify_summary_and_positions(tmp_path: Path, signer: SoftSM2Signer, case: str) -> None:
    chain = await make_chain(tmp_path, signer)
    (_, path), = list_segments(chain)
    lines = path.read_bytes().splitlines(keepends=True)
    cps = (chain / CHECKPOINTS).read_bytes().splitlines(keepends=True)
    if case == "flip":
        _flip(chain, 5)
        want = (5, *_where(chain, 5), 4, 4)  # seq, segment, line, offset, records verified, last good seq
    elif case == "truncate":
        path.write_bytes(b"".join(lines[:9]))
        want = (10, path.name, 10, sum(map(len, lines[:9])), 9, 9)
    elif case == "forge":
        _forge(chain)
        want = (13, *_where(chain, 13), 13, 13)
    elif case == "rechain":  # seq 5 changed and every later hash recomputed: the signed hash disagrees
        prev = bytes.fromhex(rec.loads(lines[3])["hash"])
        for i in range(4, len(lines)):
            obj = rec.loads(lines[i])
            obj.pop("hash")
            if i == 4:
                obj["outcome"] = "failure"
            lines[i], prev = rec.encode(obj, prev)
        path.write_bytes(b"".join(lines))
        want = (12, *_where(chain, 12), 12, 12)
    elif case == "bad_signature":
        obj = rec.loads(cps[1])
        obj["sig"] = obj["sig"][:-4] + ("0000" if obj["sig"][-4:] != "0000" else "1111")
        (chain / CHECKPOINTS).write_bytes(cps[0] + rec.canonical(obj) + b"\n")
        want = (12, CHECKPOINTS, 2, len(cps[0]), 12, 12)
    else:
        (chain / CHECKPOINTS).unlink()
        want = (1, path.name, 1, 0, 12, 12)
    report: ChainReport = await verify_chain(chain, _sig(signer))
    p = report.problem
    assert p is not None
    assert (p.seq, p.segment, p.line, p.offset, report.records, report.last_seq) == want, str(p)
    assert f"seq {want[0]}" in str(p) and f"{want[1]} line {want[2]} (byte {want[3]})" in str(p)
    assert report.first_seq == 1
    assert report.checkpoints == (0 if case == "no_checkpoints" else 2)
    assert report.signed_seq == (0 if case == "no_checkpoints" else 12)
    d = report.to_dict()
    assert d["ok"] is False and d["problem"]["seq"] == want[0] and d["last_seq"] == want[5]


# -- the operator's way past a crash's unsigned tail --------------------------------------------------------
async def test_crash_tail_refused_until_accepted_with_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from xcstack.config import load_settings
    from xcstack.security.keys import local_signer

    data = tmp_path / "data"
    monkeypatch.setenv("XC_DATA_DIR", str(data))
    monkeypatch.setenv("XC_CRYPTO__ENABLED", "false")
    signer = local_signer(data, load_settings(None).security.signing_key)
    root = data / "audit"
    log = AuditLog(root, AuditSettings(checkpoint_interval_s=3600), chain="k", signer=signer)
    await log.open()  # seq 1, signed
    for i in range(3):  # seq 2..4: durable, not yet signed
        await log.append(actor="u", action="api.call", resource=f"/r/{i}", outcome="success")
    assert log._cp_task is not None
    log._cp_task.cancel()
    log.close_blocking()  # as a kill -9 leaves it: no audit.stop, no final checkpoint ...
    (_, seg), = list_segments(root / "k")
    with open(seg, "ab") as fh:  # noqa: ASYNC230
        fh.write(b'{"action":"api.ca')  # ... and a half-written record
    with pytest.raises(AuditIntegrityError) as exc:
        await AuditLog(root, AuditSettings(), chain="k", signer=signer).open()
    assert "records 2..4 are not covered" in exc.value.problem.reason and exc.value.problem.line == 2
    report = await verify_chain(root / "k")  # the same first position, the torn line as well
    assert report.problem is not None and (report.problem.seq, report.problem.line, report.last_seq) == (2, 2, 4)
    assert "then, at seq 5: truncated record" in report.problem.reason
    assert await _acli("audit", "accept-tail", "--chain", "k", "--through", "3") == 1  # not what is there
    assert "the unsigned tail is 2..4, not ..3" in capsys.readouterr().err
    assert await _acli("audit", "accept-tail", "--chain", "k", "--through", "4", "--reason", "kill -9 at 10:02") == 0
    assert "records 2..4 accepted" in capsys.readouterr().out
    accepted = [r for r in audit_records(root) if r["action"] == "audit.tail_accepted"]
    assert len(accepted) == 1 and str(accepted[0]["actor"]).startswith("cli:")
    detail = accepted[0]["detail"]
    assert isinstance(detail, dict) and (detail["first_seq"], detail["last_seq"], detail["signed_seq"]) == (2, 4, 1)
    assert detail["reason"] == "kill -9 at 10:02"
    recovered = [r for r in audit_records(root) if r["action"] == "audit.recovered"]
    assert len(recovered) == 1 and recovered[0]["detail"]["truncated_bytes"] == 17  # type: ignore[index]
    assert await _acli("audit", "verify", "--dir", str(root)) == 0
    again = AuditLog(root, AuditSettings(), chain="k", signer=signer)
    await again.open()  # covered now: starts
    await again.close()
    assert await _acli("audit", "accept-tail", "--chain", "k", "--through", "9") == 1  # nothing left to accept


def test_capability_start_refuses_or_reports_read_only_in_readyz(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from xcstack.app import create_app
    from xcstack.config import load_settings
    from xcstack.security.capability import SecurityCapability
    from xcstack.security.keys import local_signer

    data = tmp_path / "data"

    def settings(mode: str):  # type: ignore[no-untyped-def]
        return load_settings(None, data_dir=data, crypto={"enabled": False},
                             security={"audit": {"node": "n", "on_integrity_failure": mode}})

    signer = local_signer(data, settings("refuse").security.signing_key)
    asyncio.run(make_chain(data / "audit", signer, name="n-0"))
    _forge(data / "audit" / "n-0")
    with pytest.raises(AuditIntegrityError, match="chain n-0: first bad record at seq 13"):
        with TestClient(create_app(settings("refuse"), ["xcstack.security.capability"])):
            pass
    app = create_app(settings("read_only"), ["xcstack.security.capability"])
    with TestClient(app) as c:
        cap = next(x for x in app.state.xc.capabilities if isinstance(x, SecurityCapability))
        assert c.portal is not None
        ok, detail = c.portal.call(cap.ready)
        assert ok and cap.audit.chain == "n-1"
        assert "AUDIT INTEGRITY FAILURE" in detail and "chain n-0: first bad record at seq 13" in detail
