"""PKCS#11 backend through PyKCS11 (it passes raw vendor mechanism ids; python-pkcs11 rejects them).

Chinese HSMs expose SM2/SM3/SM4 as vendor-defined mechanisms (Sansec SM2 sign 0x80008104, TASS
CKK_SM2 0x80000004, ...), so every key type and mechanism id is configuration
(`[crypto.pkcs11]`). Keys are generated on the token (sensitive, not extractable) and found again
by label `xcstack:<name>:v<version>`; the keystore records label and public key only.

Safety and parallelism:
- library load + C_Initialize + login run under an inter-process file lock: parallel start-ups
  (owner restart racing the CLI) lost the token on SoftHSM when not serialised;
- C_Initialize is called by us, through ctypes, with CKF_OS_LOCKING_OK before PyKCS11 loads the
  library (PyKCS11 passes NULL, which tells the library "one thread only": SoftHSM then disables its
  mutexes, the cause of the multi-thread crashes in FIELD-NOTES). PyKCS11's own C_Initialize then
  answers CKR_CRYPTOKI_ALREADY_INITIALIZED, which it accepts;
- `[crypto.pkcs11] sessions` sessions ("lanes"), each used by one thread at a time: a thread takes a
  free lane for every call. With OS locking granted and the ctypes fast path, the owner signs on
  several lanes at once (the GIL is released in C_Sign); otherwise there is one lane.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcstack.crypto.backends.base import Backend, KeyMaterial, require_kind
from xcstack.crypto.errors import (
    BackendError,
    CryptoUnavailable,
    DecryptionFailed,
    MalformedCiphertext,
    UnsupportedOperation,
)
from xcstack.crypto.keystore import KeyRecord
from xcstack.crypto.primitives.curve import N
from xcstack.crypto.primitives.sm2 import SM2PublicKey
from xcstack.crypto.primitives.sm3 import sm3
from xcstack.crypto.settings import CryptoSettings, Pkcs11Settings

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_PARAMS = "06082a8648ce3d030107"
SM2_PARAMS = "06082a811ccf5501822d"
GCM_NONCE = 12

_init_lock = threading.Lock()
log = logging.getLogger("xcstack.crypto.pkcs11")
CKF_OS_LOCKING_OK = 0x2
CKR_CANT_LOCK = 0xA
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


class _CKInitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p), ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p), ("flags", ctypes.c_ulong), ("pReserved", ctypes.c_void_p),
    ]


_os_locked: set[str] = set()  # libraries this process initialised with OS locking


def initialize_os_locking(library: str) -> bool:
    """C_Initialize(CKF_OS_LOCKING_OK) on `library`; True when the library may be called from
    several threads at once. Already initialised by someone else in this process: we cannot know
    how, so False (one lane)."""
    try:
        lib = ctypes.CDLL(library)
    except OSError:
        return False  # PyKCS11's load reports the real error
    init = lib.C_Initialize
    init.argtypes, init.restype = [ctypes.c_void_p], ctypes.c_ulong
    args = _CKInitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
    rv = int(init(ctypes.byref(args)))
    if rv == 0:
        _os_locked.add(library)
        return True
    if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED and library in _os_locked:
        return True
    if rv == CKR_CANT_LOCK:
        log.warning("PKCS#11 library %s cannot lock for threads (CKR_CANT_LOCK): one session only", library)
    elif rv != CKR_CRYPTOKI_ALREADY_INITIALIZED:
        log.warning("PKCS#11 C_Initialize(OS locking) on %s returned 0x%x: one session only", library, rv)
    return False


@dataclass(eq=False)
class _Lane:
    """One PKCS#11 session; used by one thread at a time."""

    session: Any  # PyKCS11 Session
    handle: int  # CK_SESSION_HANDLE for the ctypes fast path
    # this lane's C_Sign output buffer and length (reused: one call at a time per lane)
    sig_buf: Any = field(default_factory=lambda: ctypes.create_string_buffer(512))
    sig_len: Any = field(default_factory=lambda: ctypes.c_ulong(512))


class _CKMechanism(ctypes.Structure):
    _fields_ = [("mechanism", ctypes.c_ulong), ("pParameter", ctypes.c_void_p), ("ulParameterLen", ctypes.c_ulong)]


class _FastPath:
    """C_SignInit/C_Sign and C_VerifyInit/C_Verify straight through ctypes on the library PyKCS11
    loaded (same dlopen handle, same initialised state). ctypes releases the GIL during the call,
    so the owner's event loop keeps serving IPC on the other core while the token signs; PyKCS11's
    SWIG wrappers hold the GIL and copy every byte through a Python iterator."""

    def __init__(self, library: str) -> None:
        lib = ctypes.CDLL(library)
        ul, vp, pul = ctypes.c_ulong, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)
        pm = ctypes.POINTER(_CKMechanism)
        self.sign_init, self.sign = lib.C_SignInit, lib.C_Sign
        self.verify_init, self.verify = lib.C_VerifyInit, lib.C_Verify
        self.sign_init.argtypes = [ul, pm, ul]
        self.sign.argtypes = [ul, ctypes.c_char_p, ul, vp, pul]
        self.verify_init.argtypes = [ul, pm, ul]
        self.verify.argtypes = [ul, ctypes.c_char_p, ul, ctypes.c_char_p, ul]
        for f in (self.sign_init, self.sign, self.verify_init, self.verify):
            f.restype = ul

    @staticmethod
    def available(library: str) -> bool:
        try:
            lib = ctypes.CDLL(library)
        except OSError:
            return False
        return all(hasattr(lib, n) for n in ("C_SignInit", "C_Sign", "C_VerifyInit", "C_Verify"))


def _label(name: str, version: int) -> str:
    return f"xcstack:{name}:v{version}"


class Pkcs11Backend(Backend):
    name = "pkcs11"

    def __init__(self, cfg: Pkcs11Settings, lib: Any, sessions: list[Any]) -> None:
        import PyKCS11

        self.cfg = cfg
        self.P = PyKCS11
        self._lib = lib
        self._lanes = [_Lane(s, int(s.session.value())) for s in sessions]
        self._free: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for lane in self._lanes:
            self._free.put(lane)
        self._handles: dict[tuple[str, int, int], Any] = {}
        self._native: dict[tuple[str, int, int], int] = {}  # the same handles as ints, for ctypes
        self._mechs: dict[int, _CKMechanism] = {}
        self._fast: _FastPath | None = None
        if cfg.library is not None and _FastPath.available(str(cfg.library)):
            self._fast = _FastPath(str(cfg.library))
        self.releases_gil = self._fast is not None
        # sessions usable at once: only where the GIL is released in the call (else threads only queue)
        self.parallel = len(self._lanes) if self.releases_gil else 1

    @contextlib.contextmanager
    def _lane(self) -> Iterator[_Lane]:
        """A free session for this thread's call (blocks while all are in use)."""
        lane = self._free.get()
        try:
            yield lane
        finally:
            self._free.put(lane)

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: CryptoSettings, data_dir: Path) -> Pkcs11Backend:
        import PyKCS11

        cfg = settings.pkcs11
        if cfg.library is None:
            raise BackendError("[crypto.pkcs11] library is not set")
        lock_path = data_dir / "run" / "pkcs11-init.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with _init_lock, open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                threads_ok = initialize_os_locking(str(cfg.library))
                lib = PyKCS11.PyKCS11Lib()
                lib.load(str(cfg.library))
                slot = cls._find_slot(lib, cfg)
                flags = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
                sessions = [lib.openSession(slot, flags) for _ in range(cfg.sessions if threads_ok else 1)]
                if cfg.pin is not None:  # a login holds for every session of this process
                    try:
                        sessions[0].login(cfg.pin.get_secret_value())
                    except PyKCS11.PyKCS11Error as exc:
                        if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                            raise BackendError(f"PKCS#11 login failed: {exc}") from None
            except PyKCS11.PyKCS11Error as exc:
                raise CryptoUnavailable(f"PKCS#11 token not available: {exc}") from None
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        return cls(cfg, lib, sessions)

    @staticmethod
    def _find_slot(lib: Any, cfg: Pkcs11Settings) -> int:
        slots = lib.getSlotList(tokenPresent=True)
        if cfg.slot is not None:
            if cfg.slot not in slots:
                raise BackendError(f"PKCS#11 slot {cfg.slot} has no token")
            return int(cfg.slot)
        for slot in slots:
            if lib.getTokenInfo(slot).label.strip() == cfg.token_label:
                return int(slot)
        raise BackendError(f"no PKCS#11 token labelled {cfg.token_label!r}")

    # -- helpers --------------------------------------------------------------------------------
    def _mech(self, mech_id: int) -> Any:
        return self.P.Mechanism(mech_id, None)

    def _find(self, lane: _Lane, rec: KeyRecord, cls: int) -> Any:
        """The key's object handle (valid in every session of this process; cached)."""
        k = (rec.name, rec.version, cls)
        h = self._handles.get(k)
        if h is None:
            label = rec.handle or _label(rec.name, rec.version)
            found = lane.session.findObjects([(self.P.CKA_LABEL, label), (self.P.CKA_CLASS, cls)])
            if not found:
                raise BackendError(f"key {rec.name!r} v{rec.version} is missing on the token (label {label})")
            h = self._handles[k] = found[0]
        return h

    def _err(self, exc: Exception) -> BackendError:
        return BackendError(f"PKCS#11 call failed: {exc}")

    def _algorithm_ec(self) -> str:
        p = self.cfg.ec_params
        return "ECDSA-P256" if p == P256_PARAMS else "SM2" if p == SM2_PARAMS else "EC"

    def curve_order(self, rec: KeyRecord) -> int:
        return P256_N if rec.algorithm == "ECDSA-P256" else N

    def _prehash(self, rec: KeyRecord, data: bytes, uid: bytes) -> bytes:
        how = self.cfg.sign_prehash
        if how == "sha256":
            return hashlib.sha256(data).digest()
        if how == "sm3":
            return sm3(data)
        if how == "sm2-z":
            if rec.public_key is None:
                raise BackendError("sm2-z prehash needs the public key")
            return SM2PublicKey.from_bytes(rec.public_key).digest(data, uid)
        return data

    # -- operations -----------------------------------------------------------------------------
    def generate(self, name: str, version: int, kind: str, taken: frozenset[str] = frozenset()) -> KeyMaterial:
        P, cfg, label = self.P, self.cfg, _label(name, version)
        key_id = hashlib.sha256(label.encode()).digest()[:16]
        common = [(P.CKA_TOKEN, True), (P.CKA_LABEL, label), (P.CKA_ID, key_id)]
        with self._lane() as lane:
            try:
                if kind == "sm2":
                    pub_t = [
                        (P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, cfg.key_type), (P.CKA_VERIFY, True),
                        (P.CKA_EC_PARAMS, bytes.fromhex(cfg.ec_params)), *common,
                    ]
                    priv_t = [
                        (P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, cfg.key_type), (P.CKA_SIGN, True),
                        (P.CKA_PRIVATE, True), (P.CKA_SENSITIVE, True), (P.CKA_EXTRACTABLE, False), *common,
                    ]
                    pub, _priv = lane.session.generateKeyPair(pub_t, priv_t, self._mech(cfg.keygen_mechanism))
                    point = bytes(lane.session.getAttributeValue(pub, [P.CKA_EC_POINT])[0])
                    return KeyMaterial(_unwrap_octet(point), None, label, self._algorithm_ec())
                if kind == "sm4":
                    t = [
                        (P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, cfg.secret_key_type),
                        (P.CKA_VALUE_LEN, cfg.secret_key_bytes), (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True),
                        (P.CKA_PRIVATE, True), (P.CKA_SENSITIVE, True), (P.CKA_EXTRACTABLE, False), *common,
                    ]
                    lane.session.generateKey(t, self._mech(cfg.secret_keygen_mechanism))
                    alg = "AES-GCM" if cfg.encrypt_mechanism == 0x1087 else f"vendor-0x{cfg.encrypt_mechanism:x}"
                    return KeyMaterial(None, None, label, alg)
                t = [
                    (P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, cfg.hmac_key_type), (P.CKA_VALUE_LEN, 32),
                    (P.CKA_SIGN, True), (P.CKA_VERIFY, True), (P.CKA_PRIVATE, True), (P.CKA_SENSITIVE, True),
                    (P.CKA_EXTRACTABLE, False), *common,
                ]
                lane.session.generateKey(t, self._mech(cfg.hmac_keygen_mechanism))
                alg = "HMAC-SHA256" if cfg.hmac_mechanism == 0x251 else f"vendor-0x{cfg.hmac_mechanism:x}"
                return KeyMaterial(None, None, label, alg)
            except P.PyKCS11Error as exc:
                raise self._err(exc) from None

    def sign(self, rec: KeyRecord, data: bytes, uid: bytes) -> bytes:
        require_kind(rec, "sm2")
        digest = self._prehash(rec, data, uid)
        lane = self._free.get()  # (not the _lane() context manager: this is the owner's hot path)
        try:
            key = self._find(lane, rec, self.P.CKO_PRIVATE_KEY)
            if self._fast is not None:
                sig = self._fast_sign(lane, self._native_handle(rec, self.P.CKO_PRIVATE_KEY, key), digest)
            else:
                sig = bytes(lane.session.sign(key, digest, self._mech(self.cfg.sign_mechanism)))
        except self.P.PyKCS11Error as exc:
            raise self._err(exc) from None
        finally:
            self._free.put(lane)
        if len(sig) != 64:
            raise BackendError(f"token returned a {len(sig)}-byte signature; expected raw r||s (64)")
        return sig

    def verify(self, rec: KeyRecord, data: bytes, raw_sig: bytes, uid: bytes) -> bool:
        require_kind(rec, "sm2")
        digest = self._prehash(rec, data, uid)
        with self._lane() as lane:
            try:
                key = self._find(lane, rec, self.P.CKO_PUBLIC_KEY)
                if self._fast is not None:
                    native = self._native_handle(rec, self.P.CKO_PUBLIC_KEY, key)
                    return self._fast_verify(lane.handle, native, digest, raw_sig)
                return bool(lane.session.verify(key, digest, raw_sig, self._mech(self.cfg.sign_mechanism)))
            except self.P.PyKCS11Error as exc:
                if exc.value in (self.P.CKR_SIGNATURE_INVALID, self.P.CKR_SIGNATURE_LEN_RANGE):
                    return False
                raise self._err(exc) from None

    def _native_mech(self, mech_id: int) -> _CKMechanism:
        m = self._mechs.get(mech_id)
        if m is None:
            m = self._mechs[mech_id] = _CKMechanism(mech_id, None, 0)
        return m

    def _native_handle(self, rec: KeyRecord, cls: int, key: Any) -> int:
        """`key` (a PyKCS11 handle) as the int the ctypes calls take; cached like `_find`."""
        k = (rec.name, rec.version, cls)
        h = self._native.get(k)
        if h is None:
            h = self._native[k] = int(key.value())
        return h

    def _fast_sign(self, lane: _Lane, key: int, digest: bytes) -> bytes:
        assert self._fast is not None
        rv = self._fast.sign_init(lane.handle, ctypes.byref(self._native_mech(self.cfg.sign_mechanism)), key)
        if rv:
            raise self.P.PyKCS11Error(rv)
        n = lane.sig_len
        n.value = 512
        rv = self._fast.sign(lane.handle, digest, len(digest), lane.sig_buf, ctypes.byref(n))
        if rv:
            raise self.P.PyKCS11Error(rv)
        return lane.sig_buf.raw[: n.value]

    def _fast_verify(self, sh: int, key: int, digest: bytes, sig: bytes) -> bool:
        assert self._fast is not None
        rv = self._fast.verify_init(sh, ctypes.byref(self._native_mech(self.cfg.sign_mechanism)), key)
        if rv:
            raise self.P.PyKCS11Error(rv)
        rv = self._fast.verify(sh, digest, len(digest), sig, len(sig))
        if rv in (self.P.CKR_SIGNATURE_INVALID, self.P.CKR_SIGNATURE_LEN_RANGE):
            return False
        if rv:
            raise self.P.PyKCS11Error(rv)
        return True

    def _gcm(self, nonce: bytes, aad: bytes) -> Any:
        m = self.P.AES_GCM_Mechanism(nonce, aad, 128)
        m._mech.mechanism = self.cfg.encrypt_mechanism  # vendor SM4-GCM ids reuse CK_GCM_PARAMS
        return m

    def encrypt(self, rec: KeyRecord, plaintext: bytes, aad: bytes) -> bytes:
        require_kind(rec, "sm2", "sm4")
        if rec.kind == "sm2":
            raise UnsupportedOperation("this PKCS#11 configuration has no asymmetric encryption mechanism")
        nonce = self.random(GCM_NONCE)
        with self._lane() as lane:
            try:
                key = self._find(lane, rec, self.P.CKO_SECRET_KEY)
                ct = bytes(lane.session.encrypt(key, plaintext, self._gcm(nonce, aad)))
            except self.P.PyKCS11Error as exc:
                raise self._err(exc) from None
        return nonce + ct

    def decrypt(self, rec: KeyRecord, ciphertext: bytes, aad: bytes) -> bytes:
        require_kind(rec, "sm2", "sm4")
        if rec.kind == "sm2":
            raise UnsupportedOperation("this PKCS#11 configuration has no asymmetric encryption mechanism")
        if len(ciphertext) < GCM_NONCE + 16:
            raise MalformedCiphertext("ciphertext is shorter than nonce + tag")
        with self._lane() as lane:
            try:
                key = self._find(lane, rec, self.P.CKO_SECRET_KEY)
                return bytes(
                    lane.session.decrypt(key, ciphertext[GCM_NONCE:], self._gcm(ciphertext[:GCM_NONCE], aad))
                )
            except self.P.PyKCS11Error as exc:
                # tag mismatch: the standard says ENCRYPTED_DATA_INVALID; SoftHSM answers GENERAL_ERROR,
                # other tokens FUNCTION_FAILED. Inputs were validated, so all mean "not authentic".
                if exc.value in (
                    self.P.CKR_ENCRYPTED_DATA_INVALID,
                    self.P.CKR_ENCRYPTED_DATA_LEN_RANGE,
                    self.P.CKR_GENERAL_ERROR,
                    self.P.CKR_FUNCTION_FAILED,
                ):
                    raise DecryptionFailed() from None
                raise self._err(exc) from None

    def hmac(self, rec: KeyRecord, data: bytes) -> bytes:
        require_kind(rec, "hmac-sm3")
        with self._lane() as lane:
            try:
                key = self._find(lane, rec, self.P.CKO_SECRET_KEY)
                return bytes(lane.session.sign(key, data, self._mech(self.cfg.hmac_mechanism)))
            except self.P.PyKCS11Error as exc:
                raise self._err(exc) from None

    def random(self, n: int) -> bytes:
        with self._lane() as lane:
            try:
                return bytes(lane.session.generateRandom(n))
            except self.P.PyKCS11Error:
                return os.urandom(n)  # tokens without an RNG: the OS CSPRNG

    def forget(self, rec: KeyRecord) -> None:
        for cache in (self._handles, self._native):
            for k in [k for k in cache if k[:2] == (rec.name, rec.version)]:
                cache.pop(k, None)

    def close(self, timeout: float = 5.0) -> None:
        """Log out and close the sessions, after the calls in progress (a hung device call keeps
        its session open rather than hold up shutdown)."""
        lanes: list[_Lane] = []
        deadline = time.monotonic() + timeout
        for _ in self._lanes:
            try:
                lanes.append(self._free.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                log.warning("PKCS#11: a device call is still running at close; its session is left open")
                break
        with contextlib.suppress(Exception):
            if lanes:
                lanes[0].session.logout()
        for lane in lanes:
            with contextlib.suppress(Exception):
                lane.session.closeSession()


def _unwrap_octet(point: bytes) -> bytes:
    """CKA_EC_POINT is usually DER OCTET STRING(04||x||y); some tokens give the bare point."""
    if len(point) in (67, 35) and point[0] == 0x04 and point[1] == len(point) - 2:
        return point[2:]
    return point
