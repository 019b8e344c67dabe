"""The HSM owner as a real process: pipelined clients, kill/respawn, stuck owner, error codes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from xcstack.config import load_settings
from xcstack.crypto import sm
from xcstack.crypto.client import OwnerClient
from xcstack.crypto.errors import (
    CryptoTimeout,
    CryptoUnavailable,
    DecryptionFailed,
    KeyNotFound,
    MalformedSignature,
    WrongKeyType,
)

from .conftest import OwnerProc


def client_for(owner: OwnerProc, timeout: float = 5.0) -> OwnerClient:
    s = load_settings(None, data_dir=owner.data_dir, crypto={"call_timeout_s": timeout})
    return OwnerClient(owner.sock, s.crypto)


async def test_owner_serves_all_ops_pipelined(owner: OwnerProc) -> None:
    c = client_for(owner)
    try:
        await c.create_key("sig", "sm2")
        await c.create_key("enc", "sm4")
        await c.create_key("mac", "hmac-sm3")
        datas = [os.urandom(64) for _ in range(200)]
        sigs = await asyncio.gather(*(c.sign("sig", d) for d in datas))  # 200 in flight on one connection
        oks = await asyncio.gather(*(c.verify("sig", d, s) for d, s in zip(datas, sigs, strict=True)))
        assert all(oks)
        pub = sm.SM2PublicKey.from_pem((await c.public_key("sig"))["pem"])
        assert pub.verify(datas[0], sigs[0])
        ct = await c.encrypt("enc", b"payload", aad=b"x")
        assert await c.decrypt("enc", ct, aad=b"x") == b"payload"
        assert len(await c.hmac("mac", b"m")) == 32
        assert await c.hash(b"abc") == sm.sm3(b"abc")
        assert len(await c.random(16)) == 16
        assert [k["name"] for k in await c.list_keys()] == ["enc", "mac", "sig"]
        # errors keep their types and codes across the process boundary
        with pytest.raises(KeyNotFound):
            await c.sign("missing", b"x")
        with pytest.raises(WrongKeyType):
            await c.sign("enc", b"x")
        with pytest.raises(MalformedSignature):
            await c.verify("sig", b"x", b"garbage")
        with pytest.raises(DecryptionFailed):
            await c.decrypt("enc", ct[:-1] + bytes([ct[-1] ^ 1]), aad=b"x")
    finally:
        await c.close()


async def test_killed_owner_gives_retriable_error_then_recovers_after_respawn(owner: OwnerProc) -> None:
    c = client_for(owner, timeout=3.0)
    try:
        await c.create_key("k", "sm2")
        assert await c.sign("k", b"before")
        # in-flight calls at the moment of the kill fail fast, not at the timeout
        calls = [asyncio.create_task(c.hash(os.urandom(900_000))) for _ in range(20)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        owner.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - t0 < 2.5
        errors = [r for r in results if isinstance(r, Exception)]
        assert all(isinstance(e, CryptoUnavailable) for e in errors), errors
        # owner down: new calls fail with 503 + Retry-After within the timeout
        t0 = time.monotonic()
        with pytest.raises(CryptoUnavailable) as ei:
            await c.sign("k", b"during")
        assert time.monotonic() - t0 < 3.0
        assert ei.value.status == 503 and "Retry-After" in ei.value.headers
        # supervisor respawns it (here: the test); the same client reconnects by itself
        owner.start()
        sig = await c.sign("k", b"after")
        assert await c.verify("k", b"after", sig)
    finally:
        await c.close()


async def test_stuck_owner_times_out_never_hangs(owner: OwnerProc) -> None:
    c = client_for(owner, timeout=0.5)
    try:
        assert await c.hash(b"x")
        assert owner.proc is not None
        os.kill(owner.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(CryptoTimeout) as ei:
                await c.hash(b"y")
            assert 0.4 < time.monotonic() - t0 < 2.0
            assert ei.value.status == 503
        finally:
            os.kill(owner.proc.pid, signal.SIGCONT)
        assert await c.hash(b"z") == sm.sm3(b"z")
    finally:
        await c.close()


async def test_no_owner_at_all(data_dir: Path) -> None:
    s = load_settings(None, data_dir=data_dir, crypto={"call_timeout_s": 1.0})
    c = OwnerClient(data_dir / "run" / "none.sock", s.crypto)
    t0 = time.monotonic()
    with pytest.raises(CryptoUnavailable):
        await c.sign("k", b"x")
    assert time.monotonic() - t0 < 1.5
    await c.close()


async def test_owner_socket_is_private(owner: OwnerProc) -> None:
    assert (owner.sock.stat().st_mode & 0o777) == 0o600
    assert (owner.sock.parent.stat().st_mode & 0o777) == 0o700


async def test_owner_stderr_has_no_gmssl_trace_noise(data_dir: Path) -> None:
    """Failed SM2 verifies/decrypts make GmSSL print a call trace; the owner filters it out."""
    from .conftest import owner_env

    o = OwnerProc(data_dir, owner_env(data_dir))
    o.start()
    c = client_for(o)
    try:
        await c.create_key("noisy", "sm2")
        sig = await c.sign("noisy", b"m", fmt="raw")
        bad = sig[:-1] + bytes([sig[-1] ^ 1])
        for _ in range(5):
            assert not await c.verify("noisy", b"m", bad, fmt="raw")
        assert await c.verify("noisy", b"m", sig, fmt="raw")
    finally:
        await c.close()
        o.stop()
    assert o.proc is not None and o.proc.stderr is not None
    err = o.proc.stderr.read().decode()
    assert "GmSSL" not in err and "sm2_do_verify" not in err, err[-1000:]


def test_filter_regex_matches_gmssl_trace_only() -> None:
    from xcstack.crypto.owner import _GMSSL_TRACE

    assert _GMSSL_TRACE.match(b"/project/GmSSL/src/sm2_sign.c:328:sm2_do_verify():")
    assert _GMSSL_TRACE.match(b"/project/GmSSL/src/sm2_enc.c:527:sm2_decrypt():")
    assert not _GMSSL_TRACE.match(b'{"level":"ERROR","msg":"something else"}')


async def test_client_batches_overlapping_calls(owner: OwnerProc) -> None:
    c = client_for(owner)
    try:
        await c.create_key("b", "sm2")
        await c.create_key("e", "sm4")
        before = c.ipc_calls
        datas = [os.urandom(40) for _ in range(120)]
        sigs = await asyncio.gather(*(c.sign("b", d) for d in datas))
        assert c.ipc_calls - before < 30, "overlapping calls should travel in batches"
        pub = sm.SM2PublicKey.from_pem((await c.public_key("b"))["pem"])
        assert all(pub.verify(d, s) for d, s in zip(datas, sigs, strict=True))
        # errors stay per item inside a batch
        results = await asyncio.gather(
            c.sign("b", b"1"), c.sign("missing", b"2"), c.verify("b", b"3", b"junk"), c.sign("e", b"4"),
            c.encrypt("e", b"5"), return_exceptions=True,
        )
        assert isinstance(results[0], bytes)
        assert isinstance(results[1], KeyNotFound)
        assert isinstance(results[2], MalformedSignature)
        assert isinstance(results[3], WrongKeyType)
        assert await c.decrypt("e", results[4]) == b"5"  # type: ignore[arg-type]
    finally:
        await c.close()


async def test_batched_calls_fail_fast_when_owner_dies(owner: OwnerProc) -> None:
    c = client_for(owner, timeout=3.0)
    try:
        await c.create_key("k", "sm2")
        calls = [asyncio.create_task(c.sign("k", os.urandom(32))) for _ in range(200)]
        await asyncio.sleep(0.005)
        t0 = time.monotonic()
        owner.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - t0 < 2.5
        errors = [r for r in results if isinstance(r, Exception)]
        assert all(isinstance(e, CryptoUnavailable) for e in errors), errors[:3]
    finally:
        await c.close()


async def test_owner_refuses_socket_path_longer_than_sun_path(data_dir: Path) -> None:
    from xcstack.crypto.owner import serve_owner

    s = load_settings(None, data_dir=data_dir, crypto={"socket_path": str(data_dir / ("x" * 120) / "o.sock")})
    with pytest.raises(RuntimeError, match="too long"):
        await serve_owner(s, asyncio.Event())


async def test_client_keeps_a_bounded_window_of_frames_in_flight(owner: OwnerProc) -> None:
    """Under load, calls are held back while BATCH_WINDOW frames are in flight and go together when
    one returns: fewer, fuller frames (the owner's per-frame cost is what limited its throughput)."""
    from xcstack.crypto.client import BATCH_WINDOW

    c = client_for(owner)
    try:
        await c.create_key("w", "sm2")
        real_call, now, peak = c._call, [0], [0]

        async def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            now[0] += 1
            peak[0] = max(peak[0], now[0])
            try:
                return await real_call(*args, **kwargs)
            finally:
                now[0] -= 1

        c._call = spy  # type: ignore[method-assign]
        before = c.ipc_calls

        async def worker() -> int:
            n = 0
            for _ in range(15):
                await c.sign("w", os.urandom(32))
                n += 1
            return n

        assert sum(await asyncio.gather(*(worker() for _ in range(8)))) == 120
        assert peak[0] <= BATCH_WINDOW == 2, peak
        # Calls were batched (fewer frames than calls). How many frames exactly depends on how fast the
        # owner answers (31-45 measured), so the window itself is what the peak above asserts.
        assert c.ipc_calls - before < 120, c.ipc_calls - before
    finally:
        await c.close()


async def test_held_back_calls_still_time_out_within_their_own_timeout(owner: OwnerProc) -> None:
    c = client_for(owner, timeout=1.0)
    try:
        assert await c.hash(b"x")
        assert owner.proc is not None
        os.kill(owner.proc.pid, signal.SIGSTOP)
        try:
            first = [asyncio.create_task(c.hash(b"a"))]
            await asyncio.sleep(0)
            first += [asyncio.create_task(c.hash(b"b")) for _ in range(5)]
            await asyncio.sleep(0.6)  # two frames stuck in flight: later calls are held back
            t0 = time.monotonic()
            late = [asyncio.create_task(c.hash(b"c")) for _ in range(10)]
            results = await asyncio.gather(*first, *late, return_exceptions=True)
            # the held-back calls fail at their own deadline (~1.0 s), not a full timeout after the
            # stuck frames gave up and released them (~1.4 s)
            assert time.monotonic() - t0 < 1.25
            assert all(isinstance(r, CryptoTimeout) for r in results), results
        finally:
            os.kill(owner.proc.pid, signal.SIGCONT)
        assert await c.hash(b"z") == sm.sm3(b"z")
    finally:
        await c.close()
