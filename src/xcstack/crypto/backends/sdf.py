"""GM/T 0018 (SDF) backend: ctypes over the vendor's libsdf.so (no Python SDF binding exists).

Mapping of xcstack keys to the device:
- `sm2` key = a device key index i (handle "index:i"): the sign pair signs (SDF_InternalSign_ECC
  over e = SM3(Z||M), computed here with Z cached) and verifies (SDF_ExternalVerify_ECC with the
  exported public key); the enc pair at the same index encrypts/decrypts (SDF_InternalEncrypt_ECC /
  SDF_InternalDecrypt_ECC). Private-key use needs SDF_GetPrivateKeyAccessRight with the configured
  password, asked once per index per session. The keystore assigns the lowest free index.
- `sm4` key = two 128-bit session keys generated inside the device and kept wrapped by the device
  KEK (SDF_GenerateKeyWithKEK; re-imported with SDF_ImportKeyWithKEK): SM4-CBC (SDF_Encrypt with
  SGD_SM4_CBC, PKCS#7 padding here) then SM4-CBC-MAC (SDF_CalculateMAC, SGD_SM4_MAC) over a
  length-prefixed (aad, iv, ciphertext): encrypt-then-MAC, so tampering fails cleanly.
- `hmac-sm3`: not in GM/T 0018-2012 -> UnsupportedOperation.

Structures follow the standard with ECCref_MAX_BITS = 512 (64-byte fields, values right-aligned);
`[crypto.sdf] ecc_max_bits = 256` selects the narrow layout some vendors ship. One session, all
calls under one lock.
"""

from __future__ import annotations

import ctypes
import hmac as _hmac
import struct
import threading
from pathlib import Path
from typing import Any

from xcstack.crypto.backends.base import Backend, KeyMaterial, require_kind
from xcstack.crypto.errors import (
    BackendError,
    CryptoUnavailable,
    DecryptionFailed,
    InvalidCryptoInput,
    MalformedCiphertext,
    UnsupportedOperation,
)
from xcstack.crypto.keystore import KeyRecord
from xcstack.crypto.primitives.der import ct_c1c3c2_to_der, ct_der_to_c1c3c2
from xcstack.crypto.primitives.sm2 import SM2_MAX_PLAINTEXT, SM2PublicKey
from xcstack.crypto.settings import CryptoSettings

SDR_OK = 0
SDR_BASE = 0x01000000
SDR_NAMES = {
    0x01: "SDR_UNKNOWERR", 0x02: "SDR_NOTSUPPORT", 0x03: "SDR_COMMFAIL", 0x04: "SDR_HARDFAIL",
    0x05: "SDR_OPENDEVICE", 0x06: "SDR_OPENSESSION", 0x07: "SDR_PARDENY", 0x08: "SDR_KEYNOTEXIST",
    0x09: "SDR_ALGNOTSUPPORT", 0x0A: "SDR_ALGMODNOTSUPPORT", 0x0B: "SDR_PKOPERR", 0x0C: "SDR_SKOPERR",
    0x0D: "SDR_SIGNERR", 0x0E: "SDR_VERIFYERR", 0x0F: "SDR_SYMOPERR", 0x10: "SDR_STEPERR",
    0x14: "SDR_KEYTYPEERR", 0x15: "SDR_KEYERR", 0x16: "SDR_ENCDATAERR", 0x17: "SDR_RANDERR",
    0x18: "SDR_PRKRERR", 0x19: "SDR_MACERR", 0x1C: "SDR_NOBUFFER", 0x1D: "SDR_INARGERR", 0x1E: "SDR_OUTARGERR",
}
SDR_VERIFYERR = SDR_BASE + 0x0E
SDR_ENCDATAERR = SDR_BASE + 0x16
SDR_PARDENY = SDR_BASE + 0x07

SGD_SM4_ECB = 0x00000401
SGD_SM4_CBC = 0x00000402
SGD_SM4_MAC = 0x00000410
SGD_SM2_1 = 0x00020200
SGD_SM2_3 = 0x00020800


def _rc_name(rc: int) -> str:
    return SDR_NAMES.get(rc - SDR_BASE, f"0x{rc:08x}") if rc >= SDR_BASE else f"0x{rc:08x}"


class _Structs:
    def __init__(self, max_bits: int) -> None:
        n = (max_bits + 7) // 8
        self.n = n

        class ECCrefPublicKey(ctypes.Structure):
            _fields_ = [("bits", ctypes.c_uint), ("x", ctypes.c_ubyte * n), ("y", ctypes.c_ubyte * n)]

        class ECCSignature(ctypes.Structure):
            _fields_ = [("r", ctypes.c_ubyte * n), ("s", ctypes.c_ubyte * n)]

        class ECCCipherHeader(ctypes.Structure):
            _fields_ = [
                ("x", ctypes.c_ubyte * n), ("y", ctypes.c_ubyte * n), ("M", ctypes.c_ubyte * 32), ("L", ctypes.c_uint),
            ]

        self.Pub = ECCrefPublicKey
        self.Sig = ECCSignature
        self.CipherHeader = ECCCipherHeader

    def put(self, field: Any, v32: bytes) -> None:
        ctypes.memset(field, 0, self.n)
        ctypes.memmove(ctypes.addressof(field) + self.n - 32, v32, 32)

    def get(self, field: Any) -> bytes:
        raw = bytes(field)
        if any(raw[: self.n - 32]):
            raise BackendError("device returned a value wider than 256 bits")
        return raw[self.n - 32 :]


class SdfBackend(Backend):
    name = "sdf"
    releases_gil = True  # ctypes

    def __init__(self, lib: ctypes.CDLL, device: ctypes.c_void_p, session: ctypes.c_void_p, settings: CryptoSettings):
        self.lib = lib
        self.device = device
        self.session = session
        self.cfg = settings.sdf
        self.st = _Structs(self.cfg.ecc_max_bits)
        self._lock = threading.Lock()
        self._rights: set[int] = set()
        self._sym: dict[tuple[str, int], tuple[ctypes.c_void_p, ctypes.c_void_p]] = {}
        self._pubs: dict[tuple[str, int], SM2PublicKey] = {}
        self._declare()

    @classmethod
    def open(cls, settings: CryptoSettings, data_dir: Path) -> SdfBackend:
        if settings.sdf.library is None:
            raise BackendError("[crypto.sdf] library is not set")
        try:
            lib = ctypes.CDLL(str(settings.sdf.library))
        except OSError as exc:
            raise CryptoUnavailable(f"cannot load SDF library: {exc}") from None
        device, session = ctypes.c_void_p(), ctypes.c_void_p()
        rc = lib.SDF_OpenDevice(ctypes.byref(device))
        if rc != SDR_OK:
            raise CryptoUnavailable(f"SDF_OpenDevice failed: {_rc_name(rc)}")
        rc = lib.SDF_OpenSession(device, ctypes.byref(session))
        if rc != SDR_OK:
            lib.SDF_CloseDevice(device)
            raise CryptoUnavailable(f"SDF_OpenSession failed: {_rc_name(rc)}")
        return cls(lib, device, session, settings)

    def _declare(self) -> None:
        L, vp, ui, ub = self.lib, ctypes.c_void_p, ctypes.c_uint, ctypes.c_char_p
        pui, pvp = ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p)
        sigs: dict[str, list[Any]] = {
            "SDF_OpenDevice": [pvp], "SDF_CloseDevice": [vp], "SDF_OpenSession": [vp, pvp], "SDF_CloseSession": [vp],
            "SDF_GenerateRandom": [vp, ui, ctypes.c_void_p],
            "SDF_GetPrivateKeyAccessRight": [vp, ui, ub, ui], "SDF_ReleasePrivateKeyAccessRight": [vp, ui],
            "SDF_ExportSignPublicKey_ECC": [vp, ui, ctypes.c_void_p],
            "SDF_InternalSign_ECC": [vp, ui, ub, ui, ctypes.c_void_p],
            "SDF_ExternalVerify_ECC": [vp, ui, ctypes.c_void_p, ub, ui, ctypes.c_void_p],
            "SDF_InternalEncrypt_ECC": [vp, ui, ui, ub, ui, ctypes.c_void_p],
            "SDF_InternalDecrypt_ECC": [vp, ui, ui, ctypes.c_void_p, ctypes.c_void_p, pui],
            "SDF_GenerateKeyWithKEK": [vp, ui, ui, ui, ctypes.c_void_p, pui, pvp],
            "SDF_ImportKeyWithKEK": [vp, ui, ui, ub, ui, pvp], "SDF_DestroyKey": [vp, vp],
            "SDF_Encrypt": [vp, vp, ui, ctypes.c_void_p, ub, ui, ctypes.c_void_p, pui],
            "SDF_Decrypt": [vp, vp, ui, ctypes.c_void_p, ub, ui, ctypes.c_void_p, pui],
            "SDF_CalculateMAC": [vp, vp, ui, ctypes.c_void_p, ub, ui, ctypes.c_void_p, pui],
        }
        for fname, args in sigs.items():
            fn = getattr(L, fname, None)
            if fn is None:
                continue  # optional entry points are checked where used
            fn.argtypes = args
            fn.restype = ctypes.c_int

    def _call(self, fname: str, *args: Any) -> int:
        fn = getattr(self.lib, fname, None)
        if fn is None:
            raise UnsupportedOperation(f"the SDF library has no {fname}")
        return int(fn(*args))

    def _check(self, fname: str, *args: Any) -> None:
        rc = self._call(fname, *args)
        if rc != SDR_OK:
            raise BackendError(f"{fname} failed: {_rc_name(rc)}")

    @staticmethod
    def _index(rec: KeyRecord) -> int:
        if not rec.handle or not rec.handle.startswith("index:"):
            raise BackendError(f"key {rec.name!r} v{rec.version} has no SDF key index")
        return int(rec.handle.split(":", 1)[1])

    def _access(self, index: int) -> None:
        if index in self._rights:
            return
        pw = self.cfg.key_password.get_secret_value().encode() if self.cfg.key_password else b""
        rc = self._call("SDF_GetPrivateKeyAccessRight", self.session, index, pw, len(pw))
        if rc != SDR_OK:
            raise BackendError(f"SDF_GetPrivateKeyAccessRight({index}) failed: {_rc_name(rc)} (check key_password)")
        self._rights.add(index)

    def _export_sign_pub(self, index: int) -> bytes:
        pub = self.st.Pub()
        self._check("SDF_ExportSignPublicKey_ECC", self.session, index, ctypes.byref(pub))
        return self.st.get(pub.x) + self.st.get(pub.y)

    def _public(self, rec: KeyRecord) -> SM2PublicKey:
        k = (rec.name, rec.version)
        p = self._pubs.get(k)
        if p is None:
            if rec.public_key is None:
                raise BackendError(f"key {rec.name!r} v{rec.version} has no public key")
            p = self._pubs[k] = SM2PublicKey.from_bytes(rec.public_key)
        return p

    # -- key generation -------------------------------------------------------------------------
    def generate(self, name: str, version: int, kind: str, taken: frozenset[str] = frozenset()) -> KeyMaterial:
        with self._lock:
            if kind == "sm2":
                for index in range(1, self.cfg.max_key_index + 1):
                    if f"index:{index}" not in taken:
                        break
                else:
                    raise BackendError(f"all SDF key indexes 1..{self.cfg.max_key_index} are in use")
                pub = self._export_sign_pub(index)
                return KeyMaterial(pub, None, f"index:{index}", "SM2")
            if kind == "sm4":
                blobs = []
                for _ in range(2):  # encryption key, MAC key
                    buf = (ctypes.c_ubyte * 64)()
                    n, h = ctypes.c_uint(64), ctypes.c_void_p()
                    self._check(
                        "SDF_GenerateKeyWithKEK", self.session, 128, SGD_SM4_ECB, self.cfg.kek_index, buf,
                        ctypes.byref(n), ctypes.byref(h),
                    )
                    self._call("SDF_DestroyKey", self.session, h)
                    blobs.append(bytes(buf[: n.value]))
                sealed = b"".join(struct.pack(">H", len(b)) + b for b in blobs)
                return KeyMaterial(None, sealed, f"kek:{self.cfg.kek_index}", "SM4-CBC+MAC")
            raise UnsupportedOperation("GM/T 0018 devices have no HMAC-SM3; use the soft or pkcs11 backend")

    # -- SM2 --------------------------------------------------------------------------------------
    def sign(self, rec: KeyRecord, data: bytes, uid: bytes) -> bytes:
        require_kind(rec, "sm2")
        e = self._public(rec).digest(data, uid)
        index = self._index(rec)
        sig = self.st.Sig()
        with self._lock:
            self._access(index)
            self._check("SDF_InternalSign_ECC", self.session, index, e, 32, ctypes.byref(sig))
        return self.st.get(sig.r) + self.st.get(sig.s)

    def verify(self, rec: KeyRecord, data: bytes, raw_sig: bytes, uid: bytes) -> bool:
        require_kind(rec, "sm2")
        key = self._public(rec)
        e = key.digest(data, uid)
        pub, sig = self.st.Pub(), self.st.Sig()
        raw = key.to_bytes()
        pub.bits = 256
        self.st.put(pub.x, raw[:32])
        self.st.put(pub.y, raw[32:])
        self.st.put(sig.r, raw_sig[:32])
        self.st.put(sig.s, raw_sig[32:])
        with self._lock:
            rc = self._call(
                "SDF_ExternalVerify_ECC", self.session, SGD_SM2_1, ctypes.byref(pub), e, 32, ctypes.byref(sig)
            )
        if rc == SDR_OK:
            return True
        if rc == SDR_VERIFYERR:
            return False
        raise BackendError(f"SDF_ExternalVerify_ECC failed: {_rc_name(rc)}")

    def _cipher_buf(self, clen: int) -> tuple[Any, Any]:
        size = ctypes.sizeof(self.st.CipherHeader) + max(clen, 136) + 16
        buf = (ctypes.c_ubyte * size)()
        return buf, self.st.CipherHeader.from_buffer(buf)

    def _sm2_encrypt(self, rec: KeyRecord, plaintext: bytes) -> bytes:
        if not 1 <= len(plaintext) <= SM2_MAX_PLAINTEXT:
            raise InvalidCryptoInput(f"SM2 encrypts 1..{SM2_MAX_PLAINTEXT} bytes; use an SM4 key for bulk data")
        index = self._index(rec)
        buf, hdr = self._cipher_buf(len(plaintext))
        with self._lock:
            self._check("SDF_InternalEncrypt_ECC", self.session, index, SGD_SM2_3, plaintext, len(plaintext), buf)
        off = ctypes.sizeof(self.st.CipherHeader)
        c2 = bytes(buf[off : off + hdr.L])
        raw = b"\x04" + self.st.get(hdr.x) + self.st.get(hdr.y) + bytes(hdr.M) + c2
        return ct_c1c3c2_to_der(raw)

    def _sm2_decrypt(self, rec: KeyRecord, ciphertext: bytes) -> bytes:
        raw = ct_der_to_c1c3c2(ciphertext)
        c2 = raw[97:]
        if len(c2) > SM2_MAX_PLAINTEXT:
            raise MalformedCiphertext("SM2 ciphertext body too long")
        index = self._index(rec)
        buf, hdr = self._cipher_buf(len(c2))
        self.st.put(hdr.x, raw[1:33])
        self.st.put(hdr.y, raw[33:65])
        ctypes.memmove(hdr.M, raw[65:97], 32)
        hdr.L = len(c2)
        off = ctypes.sizeof(self.st.CipherHeader)
        ctypes.memmove(ctypes.addressof(buf) + off, c2, len(c2))
        out = (ctypes.c_ubyte * (len(c2) + 64))()
        n = ctypes.c_uint(len(out))
        with self._lock:
            self._access(index)
            rc = self._call("SDF_InternalDecrypt_ECC", self.session, index, SGD_SM2_3, buf, out, ctypes.byref(n))
        if rc != SDR_OK:
            if rc in (SDR_ENCDATAERR, SDR_BASE + 0x0C, SDR_BASE + 0x01):
                raise DecryptionFailed()
            raise BackendError(f"SDF_InternalDecrypt_ECC failed: {_rc_name(rc)}")
        return bytes(out[: n.value])

    # -- SM4 (encrypt-then-MAC with device session keys) -------------------------------------------
    def _sym_handles(self, rec: KeyRecord) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
        k = (rec.name, rec.version)
        hit = self._sym.get(k)
        if hit is not None:
            return hit
        if rec.sealed is None or not rec.handle or not rec.handle.startswith("kek:"):
            raise BackendError(f"key {rec.name!r} v{rec.version} has no wrapped SM4 keys")
        kek = int(rec.handle.split(":", 1)[1])
        blobs, pos = [], 0
        while pos < len(rec.sealed):
            (n,) = struct.unpack_from(">H", rec.sealed, pos)
            blobs.append(rec.sealed[pos + 2 : pos + 2 + n])
            pos += 2 + n
        handles = []
        for blob in blobs[:2]:
            h = ctypes.c_void_p()
            self._check("SDF_ImportKeyWithKEK", self.session, SGD_SM4_ECB, kek, blob, len(blob), ctypes.byref(h))
            handles.append(h)
        pair = (handles[0], handles[1])
        self._sym[k] = pair
        return pair

    def _mac(self, hmac_key: ctypes.c_void_p, aad: bytes, iv: bytes, ct: bytes) -> bytes:
        msg = struct.pack(">QQ", len(aad), 16 + len(ct)) + aad + iv + ct
        msg += b"\0" * (-len(msg) % 16)
        msg = struct.pack(">Q", len(msg)) + b"\0" * 8 + msg  # total-length prefix: prefix-free CBC-MAC input
        zero = (ctypes.c_ubyte * 16)()
        out = (ctypes.c_ubyte * 32)()
        n = ctypes.c_uint(32)
        self._check("SDF_CalculateMAC", self.session, hmac_key, SGD_SM4_MAC, zero, msg, len(msg), out, ctypes.byref(n))
        return bytes(out[: n.value])

    def _sm4_encrypt(self, rec: KeyRecord, plaintext: bytes, aad: bytes) -> bytes:
        pad = 16 - len(plaintext) % 16
        data = plaintext + bytes([pad]) * pad
        iv = self.random(16)
        out = (ctypes.c_ubyte * len(data))()
        n = ctypes.c_uint(len(data))
        with self._lock:
            enc, mac_key = self._sym_handles(rec)
            ivbuf = (ctypes.c_ubyte * 16).from_buffer_copy(iv)
            self._check("SDF_Encrypt", self.session, enc, SGD_SM4_CBC, ivbuf, data, len(data), out, ctypes.byref(n))
            ct = bytes(out[: n.value])
            tag = self._mac(mac_key, aad, iv, ct)
        return iv + ct + tag

    def _sm4_decrypt(self, rec: KeyRecord, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 16 + 16 + 16 or (len(blob) - 32) % 16:
            raise MalformedCiphertext("SM4 ciphertext must be IV(16) || blocks || MAC(16)")
        iv, ct, tag = blob[:16], blob[16:-16], blob[-16:]
        out = (ctypes.c_ubyte * len(ct))()
        n = ctypes.c_uint(len(ct))
        with self._lock:
            enc, mac_key = self._sym_handles(rec)
            if not _hmac.compare_digest(self._mac(mac_key, aad, iv, ct), tag):
                raise DecryptionFailed()
            ivbuf = (ctypes.c_ubyte * 16).from_buffer_copy(iv)
            self._check("SDF_Decrypt", self.session, enc, SGD_SM4_CBC, ivbuf, ct, len(ct), out, ctypes.byref(n))
        data = bytes(out[: n.value])
        pad = data[-1]
        if not 1 <= pad <= 16 or data[-pad:] != bytes([pad]) * pad:
            raise DecryptionFailed()
        return data[:-pad]

    # -- dispatch -----------------------------------------------------------------------------------
    def encrypt(self, rec: KeyRecord, plaintext: bytes, aad: bytes) -> bytes:
        require_kind(rec, "sm2", "sm4")
        return self._sm2_encrypt(rec, plaintext) if rec.kind == "sm2" else self._sm4_encrypt(rec, plaintext, aad)

    def decrypt(self, rec: KeyRecord, ciphertext: bytes, aad: bytes) -> bytes:
        require_kind(rec, "sm2", "sm4")
        return self._sm2_decrypt(rec, ciphertext) if rec.kind == "sm2" else self._sm4_decrypt(rec, ciphertext, aad)

    def hmac(self, rec: KeyRecord, data: bytes) -> bytes:
        raise UnsupportedOperation("GM/T 0018 devices have no HMAC-SM3; use the soft or pkcs11 backend")

    def random(self, n: int) -> bytes:
        buf = (ctypes.c_ubyte * n)()
        with self._lock:
            self._check("SDF_GenerateRandom", self.session, n, buf)
        return bytes(buf)

    def close(self) -> None:
        with self._lock:
            for enc, mac in self._sym.values():
                self._call("SDF_DestroyKey", self.session, enc)
                self._call("SDF_DestroyKey", self.session, mac)
            self._sym.clear()
            for index in self._rights:
                if getattr(self.lib, "SDF_ReleasePrivateKeyAccessRight", None) is not None:
                    self._call("SDF_ReleasePrivateKeyAccessRight", self.session, index)
            self._rights.clear()
            self._call("SDF_CloseSession", self.session)
            self._call("SDF_CloseDevice", self.device)
