"""PKCS#11 backend against a real SoftHSM2 token (ECDSA-P256 + AES-GCM + HMAC-SHA256 stand in for the
vendor SM2/SM4/HMAC-SM3 mechanisms, which SoftHSM does not have)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from xcstack.config import load_settings
from xcstack.crypto.client import OwnerClient
from xcstack.crypto.errors import DecryptionFailed, UnsupportedOperation, WrongKeyType
from xcstack.crypto.owner import build_service
from xcstack.crypto.service import OFFLOAD_BYTES, CryptoService

from .conftest import OwnerProc, owner_env, pkcs11_crypto


@pytest.fixture
async def p11(data_dir: Path, softhsm: dict[str, str]) -> CryptoService:
    settings = load_settings(None, data_dir=data_dir, crypto=pkcs11_crypto(softhsm))
    svc = await build_service(settings)
    yield svc  # type: ignore[misc]
    svc.close()
    await svc.keystore.store.close()


async def op(svc: CryptoService, name: str, payload: bytes = b"", **meta: object) -> tuple[dict, bytes]:
    return await svc.handle({"op": name, **meta}, memoryview(payload))


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"  # one token is shared by the whole session


async def test_pkcs11_sign_verify_with_token_keys(p11: CryptoService) -> None:
    name = _unique("p256")
    rec = await p11.create_key(name, "sm2")
    assert rec.algorithm == "ECDSA-P256" and rec.sealed is None and rec.handle
    _, sig = await op(p11, "sign", b"message", key=name)
    assert (await op(p11, "verify", b"message", key=name, sig=sig))[0]["valid"] is True
    assert (await op(p11, "verify", b"messagE", key=name, sig=sig))[0]["valid"] is False
    # independent check: cryptography verifies the token's signature with the exported public key
    pem = (await op(p11, "public_key", key=name))[0]["record"]["pem"]
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"message", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        pub.verify(sig, b"other", ec.ECDSA(hashes.SHA256()))
    # raw r||s form too
    _, raw = await op(p11, "sign", b"m2", key=name, fmt="raw")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    pub.verify(utils.encode_dss_signature(r, s), b"m2", ec.ECDSA(hashes.SHA256()))


async def test_pkcs11_aes_gcm_and_hmac(p11: CryptoService) -> None:
    enc, mac = _unique("aes"), _unique("mac")
    await p11.create_key(enc, "sm4")
    await p11.create_key(mac, "hmac-sm3")
    _, ct = await op(p11, "encrypt", b"top secret", key=enc, aad=b"hdr")
    assert (await op(p11, "decrypt", ct, key=enc, aad=b"hdr"))[1] == b"top secret"
    bad = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(DecryptionFailed):
        await op(p11, "decrypt", bad, key=enc, aad=b"hdr")
    with pytest.raises(DecryptionFailed):
        await op(p11, "decrypt", ct, key=enc, aad=b"other")
    m1 = (await op(p11, "hmac", b"data", key=mac))[1]
    assert len(m1) == 32 and m1 == (await op(p11, "hmac", b"data", key=mac))[1]
    with pytest.raises(WrongKeyType):
        await op(p11, "sign", b"x", key=enc)
    sig_key = _unique("p256")
    await p11.create_key(sig_key, "sm2")
    with pytest.raises(UnsupportedOperation):
        await op(p11, "encrypt", b"x", key=sig_key)
    assert len((await op(p11, "random", n=16))[1]) == 16


async def test_pkcs11_rotation_and_restart_finds_keys_by_label(data_dir: Path, softhsm: dict[str, str]) -> None:
    settings = load_settings(None, data_dir=data_dir, crypto=pkcs11_crypto(softhsm))
    name = _unique("rot")
    svc = await build_service(settings)
    await svc.create_key(name, "sm2")
    _, sig1 = await op(svc, "sign", b"doc", key=name)
    await svc.create_key(name, "", rotate=True)
    svc.close()
    await svc.keystore.store.close()
    svc = await build_service(settings)  # a fresh session: handles come from the token by label
    try:
        m = (await op(svc, "verify", b"doc", key=name, sig=sig1))[0]
        assert m == {"key": name, "valid": True, "version": 1}
        assert (await op(svc, "sign", b"doc", key=name))[0]["version"] == 2
    finally:
        svc.close()
        await svc.keystore.store.close()


async def test_pkcs11_vendor_mechanism_ids_are_passed_raw(data_dir: Path, softhsm: dict[str, str]) -> None:
    """A vendor id (Sansec SM2 sign) reaches the token unchanged: SoftHSM answers 'mechanism invalid'
    instead of the library refusing the id."""
    from xcstack.crypto.errors import BackendError

    settings = load_settings(None, data_dir=data_dir, crypto=pkcs11_crypto(softhsm, sign_mechanism=0x80008104))
    svc = await build_service(settings)
    try:
        name = _unique("vendor")
        await svc.create_key(name, "sm2")
        with pytest.raises(BackendError, match="MECHANISM_INVALID"):
            await op(svc, "sign", b"x", key=name)
    finally:
        svc.close()
        await svc.keystore.store.close()


async def test_pkcs11_parallel_startups_are_serialised(data_dir: Path, softhsm: dict[str, str]) -> None:
    """Several processes opening the token at once (owner respawn racing the CLI) all succeed."""
    code = (
        "import asyncio\n"
        "from xcstack.config import load_settings\n"
        "from xcstack.crypto.owner import build_service\n"
        "async def m():\n"
        "    s = await build_service(load_settings())\n"
        "    assert len(s.backend.random(8)) == 8\n"
        "    s.close(); await s.keystore.store.close()\n"
        "asyncio.run(m())\n"
    )
    env = owner_env(
        data_dir, XC_CRYPTO__BACKEND="pkcs11", XC_CRYPTO__PKCS11__LIBRARY=softhsm["library"],
        XC_CRYPTO__PKCS11__PIN="123456", SOFTHSM2_CONF=softhsm["SOFTHSM2_CONF"],
    )
    import sys

    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env, stderr=asyncio.subprocess.PIPE)
        for _ in range(4)
    ]
    results = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [r[1].decode()[-500:] for r in results]


async def test_pkcs11_through_owner_process(data_dir: Path, softhsm: dict[str, str]) -> None:
    env = owner_env(
        data_dir, XC_CRYPTO__BACKEND="pkcs11", XC_CRYPTO__PKCS11__LIBRARY=softhsm["library"],
        XC_CRYPTO__PKCS11__PIN="123456", SOFTHSM2_CONF=softhsm["SOFTHSM2_CONF"],
    )
    owner = OwnerProc(data_dir, env)
    owner.start()
    c = OwnerClient(owner.sock, load_settings(None, data_dir=data_dir).crypto)
    try:
        name = _unique("own")
        await c.create_key(name, "sm2")
        datas = [os.urandom(32) for _ in range(100)]
        sigs = await asyncio.gather(*(c.sign(name, d) for d in datas))
        assert all(await asyncio.gather(*(c.verify(name, d, s) for d, s in zip(datas, sigs, strict=True))))
        owner.kill()
        owner.start()  # respawn re-opens the token (serialised init) and finds the key by label
        assert await c.verify(name, datas[0], sigs[0])
    finally:
        await c.close()
        owner.stop()


async def test_pkcs11_fast_path_matches_pykcs11_path(p11: CryptoService) -> None:
    """The ctypes C_Sign/C_Verify path (GIL released) and PyKCS11's own path agree both ways."""
    backend = p11.backend
    assert backend.releases_gil, "SoftHSM exports C_Sign: the fast path should be on"
    name = _unique("fast")
    rec = await p11.create_key(name, "sm2")
    uid = b"1234567812345678"
    fast_sig = backend.sign(rec, b"data", uid)
    fast = backend._fast  # type: ignore[attr-defined]
    backend._fast = None  # type: ignore[attr-defined]
    try:
        assert backend.verify(rec, b"data", fast_sig, uid)
        slow_sig = backend.sign(rec, b"data", uid)
        assert not backend.verify(rec, b"datA", slow_sig, uid)
    finally:
        backend._fast = fast  # type: ignore[attr-defined]
    assert backend.verify(rec, b"data", slow_sig, uid)
    assert not backend.verify(rec, b"data", slow_sig[:-1] + bytes([slow_sig[-1] ^ 1]), uid)


def _count_submits(p11: CryptoService) -> list[int]:
    """Count the calls the service hands to a device thread (one entry each); the caller restores
    `p11._submit` if the service outlives the test."""
    submitted: list[int] = []
    real_submit = p11._submit

    def counting(executor, fn):  # type: ignore[no-untyped-def]
        submitted.append(1)
        return real_submit(executor, fn)

    p11._submit = counting  # type: ignore[method-assign]
    return submitted


async def test_pkcs11_concurrent_requests_use_device_thread(p11: CryptoService) -> None:
    name = _unique("conc")
    await p11.create_key(name, "sm2")
    submitted = _count_submits(p11)
    await op(p11, "sign", b"alone", key=name)
    assert not submitted  # a small request runs inline: no thread hand-off latency
    datas = [os.urandom(16) for _ in range(64)]
    results = await asyncio.gather(*(op(p11, "sign", d, key=name) for d in datas))
    assert not submitted  # also when many are in flight (a thread hop per call cost more than it saved)
    big = os.urandom(OFFLOAD_BYTES + 1)
    # a large input goes to the device thread, and small ones arriving meanwhile queue behind it there
    # (one session, one thread at a time)
    gate, real_sign = threading.Event(), p11.backend.sign

    def gated_sign(rec, data, uid):  # type: ignore[no-untyped-def]
        if len(data) > OFFLOAD_BYTES:
            assert gate.wait(10)
        return real_sign(rec, data, uid)

    p11.backend.sign = gated_sign  # type: ignore[method-assign]
    try:
        big_task = asyncio.create_task(op(p11, "sign", big, key=name))
        for _ in range(500):
            if p11._device_jobs:
                break
            await asyncio.sleep(0.01)
        small = [asyncio.create_task(op(p11, "sign", d, key=name)) for d in datas[:8]]
        for _ in range(500):
            if len(submitted) == 9:
                break
            await asyncio.sleep(0.01)
        assert len(submitted) == 9
        gate.set()
        both = await asyncio.gather(big_task, *small)
    finally:
        gate.set()
        p11.backend.sign = real_sign  # type: ignore[method-assign]
    assert (await op(p11, "verify", big, key=name, sig=both[0][1]))[0]["valid"]
    checks = await asyncio.gather(
        *(op(p11, "verify", d, key=name, sig=r[1]) for d, r in zip(datas, results, strict=True))
    )
    assert all(c[0]["valid"] for c in checks)
    assert p11._device_jobs == 0 and p11._active == 0
    # callers that give up mid-flight leave no stuck accounting behind
    tasks = [asyncio.create_task(op(p11, "sign", d, key=name)) for d in datas]
    await asyncio.sleep(0)
    for t in tasks[::2]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(100):
        if p11._device_jobs == 0:
            break
        await asyncio.sleep(0.01)
    assert p11._device_jobs == 0 and p11._active == 0


async def test_pkcs11_slow_device_moves_to_device_thread_and_back(p11: CryptoService) -> None:
    """A fast device runs inline on the owner's loop; a slow one (a network HSM at ms per call) gets
    the device thread so the loop keeps serving IPC (cancels, other connections) meanwhile."""
    import time as _time

    from xcstack.crypto.service import INLINE_MAX_CALL_S

    name = _unique("slow")
    await p11.create_key(name, "sm2")
    submitted = []
    real_submit, real_sign = p11._submit, p11.backend.sign

    def counting(executor, fn):  # type: ignore[no-untyped-def]
        submitted.append(1)
        return real_submit(executor, fn)

    def slow_sign(rec, data, uid):  # type: ignore[no-untyped-def]
        _time.sleep(INLINE_MAX_CALL_S * 4)
        return real_sign(rec, data, uid)

    p11._submit = counting  # type: ignore[method-assign]
    p11._call_s = 0.0  # whatever earlier tests left in the moving average
    try:
        for _ in range(5):
            await op(p11, "sign", b"fast", key=name)
        assert not submitted
        p11.backend.sign = slow_sign  # type: ignore[method-assign]
        for _ in range(3):
            await op(p11, "sign", b"slow", key=name)
        assert submitted  # the moving average went over the limit: off the loop
        n = len(submitted)
        await asyncio.gather(*(op(p11, "sign", os.urandom(8), key=name) for _ in range(4)))
        assert len(submitted) == n + 4
        p11.backend.sign = real_sign  # type: ignore[method-assign]
        for _ in range(40):  # fast again: the average decays, calls come back inline
            await op(p11, "sign", b"fast", key=name)
        n = len(submitted)
        await asyncio.gather(*(op(p11, "sign", os.urandom(8), key=name) for _ in range(4)))
        assert len(submitted) == n
    finally:
        p11.backend.sign = real_sign  # type: ignore[method-assign]
        p11._submit = real_submit  # type: ignore[method-assign]


async def test_pkcs11_sessions_sign_from_several_threads_at_once(data_dir: Path, softhsm: dict[str, str]) -> None:
    """C_Initialize with OS locking + one session per thread: threads really sign at the same time
    (GIL released in C_Sign), never more at once than there are sessions, nothing crashes, and every
    signature is valid for its own data."""
    settings = load_settings(None, data_dir=data_dir, crypto=pkcs11_crypto(softhsm, sessions=2))
    svc = await build_service(settings)
    backend = svc.backend
    assert backend.parallel == 2 and len(backend._lanes) == 2  # type: ignore[attr-defined]
    name = _unique("mt")
    rec = await svc.create_key(name, "sm2")
    uid = b"1234567812345678"
    busy, peak, lock = 0, 0, threading.Lock()
    real_fast_sign = backend._fast_sign  # type: ignore[attr-defined]

    def counting_fast_sign(lane, key, digest):  # type: ignore[no-untyped-def]
        nonlocal busy, peak
        with lock:
            busy += 1
            peak = max(peak, busy)
        try:
            return real_fast_sign(lane, key, digest)
        finally:
            with lock:
                busy -= 1

    backend._fast_sign = counting_fast_sign  # type: ignore[attr-defined]
    out: dict[int, list[tuple[bytes, bytes]]] = {}

    def signer(k: int) -> None:
        out[k] = [(d, backend.sign(rec, d, uid)) for d in (os.urandom(24) for _ in range(150))]

    try:
        threads = [threading.Thread(target=signer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(out) == [0, 1, 2, 3]
        assert peak == 2  # two sessions in use at once, never more than there are sessions
        assert all(backend.verify(rec, d, s, uid) for pairs in out.values() for d, s in pairs)
        assert backend._free.qsize() == 2  # type: ignore[attr-defined]  # every lane returned
    finally:
        backend._fast_sign = real_fast_sign  # type: ignore[attr-defined]
        svc.close()
        await svc.keystore.store.close()


async def test_pkcs11_slow_device_batch_is_spread_over_sessions_in_order(p11: CryptoService) -> None:
    """A network HSM at ms per call: a batch (what OwnerClient sends under load) is split over the
    sessions, each part on its own device thread at the same time, and each answer stays with its
    own item. A fast device keeps a batch inline on the loop (one thread)."""
    import time as _time

    from xcstack.crypto.service import INLINE_MAX_CALL_S

    name = _unique("spread")
    await p11.create_key(name, "sm2")
    threads: set[int] = set()
    busy, peak, lock = 0, 0, threading.Lock()
    real_sign = p11.backend.sign
    slow = [False]

    def tracking_sign(rec, data, uid):  # type: ignore[no-untyped-def]
        nonlocal busy, peak
        threads.add(threading.get_ident())
        with lock:
            busy += 1
            peak = max(peak, busy)
        try:
            if slow[0]:
                _time.sleep(INLINE_MAX_CALL_S * 4)
            return real_sign(rec, data, uid)
        finally:
            with lock:
                busy -= 1

    datas = [os.urandom(20) for _ in range(32)]
    items = [{"op": "sign", "key": name} for _ in datas]
    items.insert(5, {"op": "sign", "key": "no-such-key"})  # one bad item fails alone
    payloads = [*datas[:5], b"x", *datas[5:]]
    sizes = [len(p) for p in payloads]

    async def batch() -> list[bytes]:
        meta, out = await op(p11, "batch", b"".join(payloads), items=items, sizes=sizes)
        assert meta["results"][5]["error"]["code"] == "key_not_found"
        sigs, pos = [], 0
        for size in meta["sizes"]:
            sigs.append(out[pos : pos + size])
            pos += size
        del sigs[5]
        pairs = zip(datas, sigs, strict=True)
        checks = await asyncio.gather(*(op(p11, "verify", d, key=name, sig=s) for d, s in pairs))
        assert all(c[0]["valid"] for c in checks)
        return sigs

    p11.backend.sign = tracking_sign  # type: ignore[method-assign]
    try:
        p11._call_s = 0.0
        await batch()
        assert threads == {threading.get_ident()} and peak == 1  # fast: inline, one part
        slow[0], p11._call_s = True, INLINE_MAX_CALL_S * 4  # as measured on a slow device
        threads.clear()
        peak = 0
        await batch()
    finally:
        p11.backend.sign = real_sign  # type: ignore[method-assign]
    parallel = p11.backend.parallel
    assert parallel == 4  # the default [crypto.pkcs11] sessions
    assert threading.get_ident() not in threads and len(threads) == parallel and peak >= 2
    assert p11._device_jobs == 0


async def test_pkcs11_one_session_when_configured(data_dir: Path, softhsm: dict[str, str]) -> None:
    settings = load_settings(None, data_dir=data_dir, crypto=pkcs11_crypto(softhsm, sessions=1))
    svc = await build_service(settings)
    try:
        assert svc.backend.parallel == 1
        name = _unique("one")
        await svc.create_key(name, "sm2")
        svc._call_s = 1.0  # even a slow device has one session to work on
        datas = [os.urandom(8) for _ in range(8)]
        meta, _ = await op(svc, "batch", b"".join(datas), items=[{"op": "sign", "key": name}] * 8, sizes=[8] * 8)
        assert all("error" not in r for r in meta["results"])
    finally:
        svc.close()
        await svc.keystore.store.close()


async def test_pkcs11_close_does_not_wait_for_a_hung_device_call(
    data_dir: Path, softhsm: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    import time as _time

    settings = load_settings(None, data_dir=data_dir, crypto=pkcs11_crypto(softhsm, sessions=2))
    svc = await build_service(settings)
    backend = svc.backend
    held = backend._free.get()  # type: ignore[attr-defined]  # a call that never returns
    t0 = _time.monotonic()
    backend.close(timeout=0.3)  # type: ignore[call-arg]
    assert _time.monotonic() - t0 < 2
    assert "still running at close" in caplog.text
    backend._free.put(held)  # type: ignore[attr-defined]
    await svc.keystore.store.close()


async def test_pkcs11_library_initialised_without_locking_gets_one_session(
    data_dir: Path, softhsm: dict[str, str]
) -> None:
    """Someone else in the process called C_Initialize(NULL) first ("one thread only"): xcstack
    cannot know the library is thread-safe, so it keeps to one session."""
    import sys

    code = (
        "import asyncio, ctypes, os\n"
        "lib = ctypes.CDLL(os.environ['XC_CRYPTO__PKCS11__LIBRARY'])\n"
        "lib.C_Initialize.argtypes = [ctypes.c_void_p]\n"
        "assert lib.C_Initialize(None) == 0\n"
        "from xcstack.config import load_settings\n"
        "from xcstack.crypto.owner import build_service\n"
        "async def m():\n"
        "    s = await build_service(load_settings())\n"
        "    print('parallel', s.backend.parallel, len(s.backend._lanes))\n"
        "    assert len(s.backend.random(8)) == 8\n"
        "    s.close(); await s.keystore.store.close()\n"
        "asyncio.run(m())\n"
    )
    env = owner_env(
        data_dir, XC_CRYPTO__BACKEND="pkcs11", XC_CRYPTO__PKCS11__LIBRARY=softhsm["library"],
        XC_CRYPTO__PKCS11__PIN="123456", SOFTHSM2_CONF=softhsm["SOFTHSM2_CONF"],
    )
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0, err.decode()[-800:]
    assert out.decode().split() == ["parallel", "1", "1"]


async def test_pkcs11_random_on_a_slow_device_runs_off_the_loop(p11: CryptoService) -> None:
    from xcstack.crypto.service import INLINE_MAX_CALL_S

    real_submit = p11._submit
    submitted = _count_submits(p11)
    try:
        p11._call_s = 0.0
        assert len((await op(p11, "random", n=16))[1]) == 16
        assert not submitted  # fast device: inline
        p11._call_s = INLINE_MAX_CALL_S * 4
        assert len((await op(p11, "random", n=16))[1]) == 16
        assert submitted  # slow device: on a device thread, the owner's loop keeps serving
    finally:
        p11._submit = real_submit  # type: ignore[method-assign]
