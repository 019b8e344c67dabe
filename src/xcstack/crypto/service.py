"""The crypto service: keystore + backend behind one op dispatcher.

`CryptoService.handle(meta, payload)` is the single entry point. The HSM owner serves it over the
IPC channel (`meta["op"]` names the operation, bytes travel as the raw payload); in `direct` mode the
http worker calls it in-process. Both paths therefore validate, limit and fail identically.

| op | meta in | payload in | meta out | payload out |
|---|---|---|---|---|
| sign | key, version?, uid?, fmt (der/raw) | data | key, version, algorithm | signature |
| verify | key, version?, uid?, fmt, sig | data | key, valid, version | - |
| encrypt | key, aad?, fmt (der/c1c3c2/c1c2c3 for SM2) | plaintext | key, version, algorithm | ciphertext |
| decrypt | key, version?, aad?, fmt | ciphertext | key, version | plaintext |
| hmac | key, version? | data | key, version, algorithm | mac |
| hash | alg (sm3) | data | alg | digest |
| random | n (1..4096) | - | n | bytes |
| create_key | key, kind | - | record | - |
| rotate_key | key | - | record | - |
| list_keys | - | - | keys | - |
| public_key | key, version? | - | record (+ pem) | - |
| ping | - | - | backend, pid | - |
| batch | items (op metas), sizes | item payloads, concatenated | results (meta or {error}), sizes | outputs |

`batch` carries up to 256 small sign/verify/encrypt/decrypt/hmac/hash ops in one frame: the owner
prepares them (key lookups), runs all their device work in one go, and answers each item on its own
(an item's error never fails the others). `OwnerClient` forms batches by itself from calls that
overlap, so one IPC round trip and one device hand-off serve many callers.

Without an explicit `version`, verify and decrypt try the active versions newest first (rotation
keeps old ones), so data made before a rotation still verifies/decrypts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from prometheus_client import Counter, Histogram

from xcstack.crypto.backends.base import Backend
from xcstack.crypto.errors import (
    BackendError,
    DecryptionFailed,
    InputTooLarge,
    InvalidCryptoInput,
    UnsupportedOperation,
    WrongKeyType,
)
from xcstack.crypto.keystore import KIND_OPS, KINDS, KeyRecord, Keystore, check_name, new_record
from xcstack.crypto.primitives.der import (
    ct_c1c2c3_to_c1c3c2,
    ct_c1c3c2_to_c1c2c3,
    ct_c1c3c2_to_der,
    ct_der_to_c1c3c2,
    sig_der_to_raw,
    sig_raw_to_der,
)
from xcstack.crypto.primitives.sm2 import SM2PublicKey
from xcstack.crypto.primitives.sm3 import sm3
from xcstack.crypto.settings import CryptoSettings
from xcstack.errors import Overloaded, XCError
from xcstack.observability.metrics import Children

OPS_TOTAL = Counter("xc_crypto_ops_total", "Crypto operations", ["op", "backend", "outcome"])
OP_SECONDS = Histogram(
    "xc_crypto_op_seconds",
    "Crypto operation time inside the key owner",
    ["op", "backend"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5),
)

_OPS = Children(OPS_TOTAL, limit=1000)  # bounded: op names are validated, outcomes are error codes
_SECONDS = Children(OP_SECONDS, limit=1000)


def _observe(op: str, backend: str, outcome: str, seconds: float) -> None:
    _OPS(op, backend, outcome).inc()
    _SECONDS(op, backend).observe(seconds)


OFFLOAD_BYTES = 64 * 1024  # inputs above this run on a thread so the event loop keeps moving
# device calls run inline on the owner's loop while they average (EWMA) at most this long; a slower
# device (a network HSM at a few ms a call) gets the device thread so the loop keeps serving IPC
INLINE_MAX_CALL_S = 0.0005
MAX_RANDOM = 4096
Meta = dict[str, Any]
Handler = Callable[["CryptoService", Meta, memoryview], Awaitable[tuple[Meta, bytes]]]
Work = Callable[[], tuple[Meta, bytes]]
Prep = Callable[["CryptoService", Meta, memoryview], Awaitable[Work]]
MAX_BATCH = 256
BATCHABLE = frozenset({"sign", "verify", "encrypt", "decrypt", "hmac", "hash"})
log = logging.getLogger("xcstack.crypto.service")


def _error_meta(exc: XCError) -> Meta:
    return {"error": {"code": exc.code, "message": exc.message, "retriable": isinstance(exc, Overloaded)}}


def _as_bytes(v: Any, what: str) -> bytes:
    if v is None:
        return b""
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("utf-8")
    raise InvalidCryptoInput(f"{what} must be bytes")


def _version(meta: Meta) -> int | None:
    v = meta.get("version")
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InvalidCryptoInput("version must be a positive integer")
    return v


class CryptoService:
    def __init__(self, keystore: Keystore, backend: Backend, settings: CryptoSettings) -> None:
        self.keystore = keystore
        self.backend = backend
        self.settings = settings
        self.default_uid = settings.default_uid.encode("utf-8")
        # device threads for large inputs and slow devices on GIL-releasing backends (ctypes), one per
        # session the backend can use at once; small ops on a fast device run inline
        self._device: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(backend.parallel, thread_name_prefix="xc-crypto-device")
            if backend.releases_gil
            else None
        )
        self._call_s = 0.0  # moving average of one device call (seconds)
        self._active = 0  # requests inside handle() right now
        self._device_jobs = 0  # calls submitted to the device thread and not finished
        self._jobs_lock = threading.Lock()
        self._prep: dict[str, Prep] = {
            "sign": CryptoService._prep_sign,
            "verify": CryptoService._prep_verify,
            "encrypt": CryptoService._prep_encrypt,
            "decrypt": CryptoService._prep_decrypt,
            "hmac": CryptoService._prep_hmac,
            "hash": CryptoService._prep_hash,
        }
        self._ops: dict[str, Handler] = {
            "random": CryptoService._random,
            "create_key": CryptoService._create_key,
            "rotate_key": CryptoService._rotate_key,
            "list_keys": CryptoService._list_keys,
            "public_key": CryptoService._public_key,
            "ping": CryptoService._ping,
        }

    # -- entry point ------------------------------------------------------------------------
    async def handle(self, meta: Meta, payload: memoryview | bytes) -> tuple[Meta, bytes]:
        op = meta.get("op")
        prep = self._prep.get(op) if isinstance(op, str) else None
        fn = self._ops.get(op) if isinstance(op, str) else None
        if prep is None and fn is None and op != "batch":
            raise InvalidCryptoInput(f"unknown crypto operation {op!r}")
        if len(payload) > self.settings.max_input_bytes:
            raise InputTooLarge(f"input is {len(payload)} bytes; the limit is {self.settings.max_input_bytes}")
        mv = memoryview(payload)
        t0 = time.perf_counter()
        outcome = "ok"
        self._active += 1
        try:
            if op == "batch" or prep is not None:
                if op == "batch":
                    return await self._batch(meta, mv)
                assert prep is not None
                work = await prep(self, meta, mv)
                return cast("tuple[Meta, bytes]", await self._run(len(mv), work, 1))
            assert fn is not None
            return await fn(self, meta, mv)
        except XCError as exc:
            outcome = exc.code
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            self._active -= 1
            if op != "batch":  # batch items are counted one by one
                _observe(str(op), self.backend.name, outcome, time.perf_counter() - t0)

    async def _run(self, size: int, fn: Callable[[], Any], calls: int) -> Any:
        if self._device is not None:
            if self._device_jobs or size > OFFLOAD_BYTES or self._call_s > INLINE_MAX_CALL_S:
                # large input, slow device (or the device thread is busy: one session, one thread
                # at a time): the device thread works (GIL released in C) while the loop serves IPC
                return await self._submit(self._device, lambda: self._timed(fn, calls))
            # a fast device (SoftHSM sign ~70 us) runs inline, also under load: a thread hand-off
            # per call cost more than it overlapped on 2 cores (bench/crypto.py: owner 0.46x ->
            # ~0.55-0.7x of direct with this and the client's frame window)
            return self._timed(fn, calls)
        if size > OFFLOAD_BYTES:
            return await asyncio.to_thread(fn)
        return fn()

    def _spread(self, works: list[Any]) -> list[list[Any]]:
        """A batch for a slow device (a network HSM at ms per call) split into one part per session
        it can use at once; else one part. A fast device (SoftHSM, ~70 us) stays inline in one
        part: spreading it over a second thread doubled the owner's CPU per sign on 2 cores (GIL
        and mutex hand-offs per call) and lowered its throughput (bench/crypto.py: 0.57x vs 0.68x)."""
        n = min(self.backend.parallel, len(works))
        if self._device is None or n < 2 or self._call_s <= INLINE_MAX_CALL_S:
            return [works]
        step = -(-len(works) // n)
        return [works[k : k + step] for k in range(0, len(works), step)]

    async def _run_parallel(self, job: Callable[[list[Any]], list[Any]], parts: list[list[Any]]) -> list[Any]:
        """`job(part)` for every part on its own device thread (and session), all at once; results
        in order."""
        assert self._device is not None
        futs = [
            self._submit(self._device, functools.partial(self._timed, functools.partial(job, part), len(part)))
            for part in parts
        ]
        done: list[Any] = []
        for part_done in await asyncio.gather(*futs):
            done.extend(part_done)
        return done

    def _timed(self, fn: Callable[[], Any], calls: int) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            per_call = (time.perf_counter() - t0) / max(1, calls)
            self._call_s += 0.2 * (per_call - self._call_s)

    def _submit(self, executor: ThreadPoolExecutor, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `fn` on the device thread; `_device_jobs` counts it until it really finished (or was
        cancelled before it started), also when the waiting caller went away."""
        with self._jobs_lock:
            self._device_jobs += 1

        def job() -> Any:
            try:
                return fn()
            finally:
                self._job_finished()

        cf = executor.submit(job)
        cf.add_done_callback(lambda f: self._job_finished() if f.cancelled() else None)
        return asyncio.wrap_future(cf)

    def _job_finished(self) -> None:
        with self._jobs_lock:
            self._device_jobs -= 1

    def _uid(self, meta: Meta) -> bytes:
        uid = _as_bytes(meta.get("uid"), "uid") or self.default_uid
        if len(uid) > 1024:
            raise InvalidCryptoInput("uid must be at most 1024 bytes")
        return uid

    async def _key(self, meta: Meta, op: str) -> tuple[str, list[KeyRecord]]:
        name = meta.get("key")
        if not isinstance(name, str):
            raise InvalidCryptoInput("key (a key name) is required")
        check_name(name)
        version = _version(meta)
        recs = [await self.keystore.get(name, version)] if version else await self.keystore.versions(name)
        recs = await self._with_public_keys(recs)
        if op not in KIND_OPS.get(recs[0].kind, frozenset()):
            raise WrongKeyType(f"key {name!r} is a {recs[0].kind} key; it cannot {op}")
        return name, recs

    async def _with_public_keys(self, recs: list[KeyRecord]) -> list[KeyRecord]:
        """SM2 records stored without their public half (older keystores) get it derived once, through the
        backend, and stored with the key: no operation ever computes it again."""
        if all(r.public_key is not None or r.kind != "sm2" for r in recs):
            return recs
        out = []
        for rec in recs:
            if rec.kind == "sm2" and rec.public_key is None:
                pub = await asyncio.to_thread(self.backend.derive_public_key, rec)
                if pub is not None:
                    rec = await self.keystore.store_public_key(rec, pub)
            out.append(rec)
        return out

    # -- operations: each prepares asynchronously (key lookup, validation) and returns the
    # synchronous work (device call + encoding), so a batch can run all its work in one go ------
    async def _prep_sign(self, meta: Meta, payload: memoryview) -> Work:
        name, recs = await self._key(meta, "sign")
        rec, uid, fmt = recs[0], self._uid(meta), meta.get("fmt", "der")
        if fmt not in ("der", "raw"):
            raise InvalidCryptoInput("fmt must be 'der' or 'raw'")
        data, n, backend = bytes(payload), self.backend.curve_order(rec), self.backend

        def work() -> tuple[Meta, bytes]:
            raw = backend.sign(rec, data, uid)
            sig = raw if fmt == "raw" else sig_raw_to_der(raw, n)
            return {"key": name, "version": rec.version, "algorithm": rec.algorithm}, sig

        return work

    async def _prep_verify(self, meta: Meta, payload: memoryview) -> Work:
        name, recs = await self._key(meta, "verify")
        uid, fmt = self._uid(meta), meta.get("fmt", "der")
        sig = _as_bytes(meta.get("sig"), "sig")
        if fmt not in ("der", "raw"):
            raise InvalidCryptoInput("fmt must be 'der' or 'raw'")
        tries = []
        for rec in recs:
            n = self.backend.curve_order(rec)
            raw = sig if fmt == "raw" else sig_der_to_raw(sig, n)
            if fmt == "raw":
                sig_raw_to_der(raw, n)  # length / range validation
            tries.append((rec, raw))
        data, backend = bytes(payload), self.backend

        def work() -> tuple[Meta, bytes]:
            for rec, raw in tries:
                if backend.verify(rec, data, raw, uid):
                    return {"key": name, "valid": True, "version": rec.version}, b""
            return {"key": name, "valid": False, "version": None}, b""

        return work

    async def _prep_encrypt(self, meta: Meta, payload: memoryview) -> Work:
        name, recs = await self._key(meta, "encrypt")
        rec, aad = recs[0], _as_bytes(meta.get("aad"), "aad")
        fmt = meta.get("fmt", "der")
        if fmt not in ("der", "c1c3c2", "c1c2c3"):
            raise InvalidCryptoInput("fmt must be 'der', 'c1c3c2' or 'c1c2c3'")
        if rec.kind == "sm2" and aad:
            raise InvalidCryptoInput("SM2 encryption takes no aad")
        data, backend = bytes(payload), self.backend

        def work() -> tuple[Meta, bytes]:
            ct = backend.encrypt(rec, data, aad)
            if rec.kind == "sm2" and fmt != "der":
                ct = ct_der_to_c1c3c2(ct)
                if fmt == "c1c2c3":
                    ct = ct_c1c3c2_to_c1c2c3(ct)
            return {"key": name, "version": rec.version, "algorithm": rec.algorithm}, ct

        return work

    async def _prep_decrypt(self, meta: Meta, payload: memoryview) -> Work:
        name, recs = await self._key(meta, "decrypt")
        aad, fmt = _as_bytes(meta.get("aad"), "aad"), meta.get("fmt", "der")
        if fmt not in ("der", "c1c3c2", "c1c2c3"):
            raise InvalidCryptoInput("fmt must be 'der', 'c1c3c2' or 'c1c2c3'")
        ct = bytes(payload)
        if recs[0].kind == "sm2" and fmt != "der":
            ct = ct_c1c3c2_to_der(ct if fmt == "c1c3c2" else ct_c1c2c3_to_c1c3c2(ct))
        backend = self.backend

        def work() -> tuple[Meta, bytes]:
            for rec in recs:
                try:
                    pt = backend.decrypt(rec, ct, aad)
                except DecryptionFailed:
                    continue
                return {"key": name, "version": rec.version}, pt
            raise DecryptionFailed()

        return work

    async def _prep_hmac(self, meta: Meta, payload: memoryview) -> Work:
        name, recs = await self._key(meta, "hmac")
        rec, data, backend = recs[0], bytes(payload), self.backend

        def work() -> tuple[Meta, bytes]:
            return {"key": name, "version": rec.version, "algorithm": rec.algorithm}, backend.hmac(rec, data)

        return work

    async def _prep_hash(self, meta: Meta, payload: memoryview) -> Work:
        alg = meta.get("alg", "sm3")
        if alg != "sm3":
            raise UnsupportedOperation("hash alg must be 'sm3'")
        return lambda: ({"alg": "sm3"}, sm3(payload))

    # -- batches: many small ops in one IPC frame; one device hand-off for all of them ---------
    async def _batch(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        items, sizes = meta.get("items"), meta.get("sizes")
        if (
            not isinstance(items, list)
            or not isinstance(sizes, list)
            or len(items) != len(sizes)
            or not 1 <= len(items) <= MAX_BATCH
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)
            or sum(sizes) != len(payload)
        ):
            raise InvalidCryptoInput(f"batch needs 1..{MAX_BATCH} items and sizes that add up to the payload")
        results: list[Meta | None] = [None] * len(items)
        outs: list[bytes] = [b""] * len(items)
        works: list[tuple[int, str, Work]] = []
        pos = 0
        for i, (m, size) in enumerate(zip(items, sizes, strict=True)):
            part = payload[pos : pos + size]
            pos += size
            op = m.get("op") if isinstance(m, dict) else None
            prep = self._prep.get(op) if isinstance(op, str) else None
            try:
                if prep is None:
                    raise InvalidCryptoInput(f"operation {op!r} cannot be batched")
                if size > self.settings.max_input_bytes:
                    raise InputTooLarge(f"input is {size} bytes; the limit is {self.settings.max_input_bytes}")
                works.append((i, str(op), await prep(self, m, part)))
            except XCError as exc:
                results[i] = _error_meta(exc)
                _observe(str(op), self.backend.name, exc.code, 0.0)

        def job(part: list[tuple[int, str, Work]]) -> list[tuple[int, str, tuple[Meta, bytes] | XCError, float]]:
            done: list[tuple[int, str, tuple[Meta, bytes] | XCError, float]] = []
            for i, op, work in part:
                t0 = time.perf_counter()
                res: tuple[Meta, bytes] | XCError
                try:
                    res = work()
                except XCError as exc:
                    res = exc
                except Exception:
                    log.exception("crypto op %r failed in the backend (batch item)", op)
                    res = BackendError("crypto backend failure (see the HSM owner's log)")
                done.append((i, op, res, time.perf_counter() - t0))
            return done

        if works:
            parts = self._spread(works)
            if len(parts) == 1:
                done = await self._run(len(payload), lambda: job(works), len(works))
            else:
                done = await self._run_parallel(job, parts)
            for i, op, res, dt in done:
                if isinstance(res, XCError):
                    results[i] = _error_meta(res)
                    _observe(op, self.backend.name, res.code, dt)
                else:
                    results[i], outs[i] = res
                    _observe(op, self.backend.name, "ok", dt)
        return {"results": results, "sizes": [len(o) for o in outs]}, b"".join(outs)

    async def _random(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        n = meta.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_RANDOM:
            raise InvalidCryptoInput(f"n must be an integer 1..{MAX_RANDOM}")
        # through _run like every device call: on a slow device it must not hold up the owner's loop
        return {"n": n}, await self._run(n, lambda: self.backend.random(n), 1)

    # -- key management ---------------------------------------------------------------------
    async def create_key(self, name: str, kind: str, *, rotate: bool = False) -> KeyRecord:
        check_name(name)
        if rotate:
            current = await self.keystore.get(name)
            kind = current.kind
        elif kind not in KINDS:
            raise InvalidCryptoInput(f"key kind must be one of {', '.join(KINDS)}")
        version = await self.keystore.next_version(name)
        if not rotate and version > 1:
            from xcstack.crypto.errors import KeyExists

            raise KeyExists(f"key {name!r} already exists (use rotate for a new version)")
        taken = await self.keystore.handles(self.backend.name)
        mat = await asyncio.to_thread(self.backend.generate, name, version, kind, taken)
        rec = new_record(name, version, kind, self.backend.name, mat.algorithm, mat.public_key, mat.sealed, mat.handle)
        await self.keystore.insert(rec, must_be_new=not rotate)
        return rec

    async def _create_key(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        rec = await self.create_key(str(meta.get("key", "")), str(meta.get("kind", "")))
        return {"record": rec.public_info()}, b""

    async def _rotate_key(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        rec = await self.create_key(str(meta.get("key", "")), "", rotate=True)
        return {"record": rec.public_info()}, b""

    async def _list_keys(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        return {"keys": await self.keystore.list()}, b""

    async def _public_key(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        name = meta.get("key")
        if not isinstance(name, str):
            raise InvalidCryptoInput("key (a key name) is required")
        rec = (await self._with_public_keys([await self.keystore.get(check_name(name), _version(meta))]))[0]
        info = rec.public_info()
        if rec.public_key is None:
            raise WrongKeyType(f"key {name!r} is a {rec.kind} key; it has no public part")
        info["pem"] = public_pem(rec)
        return {"record": info}, b""

    async def _ping(self, meta: Meta, payload: memoryview) -> tuple[Meta, bytes]:
        return {"backend": self.backend.name, "pid": os.getpid()}, b""

    def close(self) -> None:
        if self._device is not None:
            self._device.shutdown(wait=True)
            self._device = None
        self.backend.close()


def public_pem(rec: KeyRecord) -> str:
    """PEM SubjectPublicKeyInfo of a key's public half (SM2 or, for PKCS#11 test tokens, P-256)."""
    assert rec.public_key is not None
    if rec.algorithm == "SM2" or len(rec.public_key) == 64:
        return SM2PublicKey.from_bytes(rec.public_key).to_pem()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), rec.public_key)
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
