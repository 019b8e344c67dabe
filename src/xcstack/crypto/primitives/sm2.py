"""SM2 (GM/T 0003) keys: sign/verify, encrypt/decrypt, encodings, over a native backend chosen at import.

    SM2PrivateKey.generate() / .from_bytes(d32) / (d32, public_key); .sign(data, uid=..., fmt="der"|"raw"),
    .decrypt(ct, fmt="der"|"c1c3c2"|"c1c2c3"); SM2PublicKey.from_bytes(raw64 | 04||x||y | 02/03||x | SPKI
    DER), .from_pem, .verify(data, sig, uid=..., fmt) -> bool, .encrypt(pt, fmt), .to_pem().

Z = SM3(ENTL||ID||a||b||xG||yG||xA||yA) is computed once per (key, user id) and cached, so a signature
costs one SM3 over the message plus the backend's scalar multiplication. Every operation on a secret
scalar (signing, decryption, and d*G when a private key comes without its public half) runs in the
backend (`sm2_backends.py`: `XC_SM2_BACKEND=auto` = the system OpenSSL 3 libcrypto, else gmssl-pyx, else
gmalglib); encodings, range checks, Z and the digest are computed here, so every backend gets the same
validated input and gives the same answers. `sm2_backend_info()` says which backend runs and why the
others did not load; with none, SM2 raises `CryptoUnavailable` (SM3/SM4 still work).

Never the pure-Python `gmssl` package: it draws signing nonces from `random` and skips the C3 check.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes

from xcstack.crypto.errors import (
    CryptoUnavailable,
    DecryptionFailed,
    InvalidCryptoInput,
    MalformedCiphertext,
    MalformedKey,
)
from xcstack.crypto.primitives.curve import CURVE_BYTES, N, P, decompress, on_curve
from xcstack.crypto.primitives.der import (
    ct_c1c2c3_to_c1c3c2,
    ct_c1c3c2_to_c1c2c3,
    ct_c1c3c2_to_der,
    ct_der_to_c1c3c2,
    pem_encode,
    sig_der_to_raw,
    sig_raw_to_der,
    split_c1c3c2,
)
from xcstack.crypto.primitives.sm2_backends import SM2Backend, select_backend
from xcstack.crypto.primitives.sm3 import sm3

SigFormat = Literal["der", "raw"]
CtFormat = Literal["der", "c1c3c2", "c1c2c3"]

DEFAULT_UID = b"1234567812345678"  # GM/T 0009 default user id
SM2_MAX_PLAINTEXT = 255  # one limit on every backend (GmSSL's): SM2 encryption is for small secrets, SM4 for bulk

# SubjectPublicKeyInfo prefix: id-ecPublicKey + curve sm2 (1.2.156.10197.1.301), uncompressed point
_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a811ccf5501822d03420004")

# The backend is chosen once at import; `set_sm2_backend` switches it for tests and benchmarks.
_sm2_wanted = os.environ.get("XC_SM2_BACKEND", "auto").strip().lower() or "auto"
_sm2, _sm2_errors = select_backend(_sm2_wanted)
_sm2_loaded: dict[str, SM2Backend] = {_sm2.name: _sm2} if _sm2 is not None else {}


def _backend() -> SM2Backend:
    b = _sm2
    if b is None:
        why = "; ".join(f"{k}: {v}" for k, v in _sm2_errors.items())
        raise CryptoUnavailable(f"no SM2 backend could be loaded (XC_SM2_BACKEND={_sm2_wanted}): {why}")
    return b


def sm2_backend_info() -> dict[str, Any]:
    """Which SM2 backend runs (for doctor and the SBOM) and why the ones tried before it did not load."""
    b = _sm2
    return {
        "wanted": _sm2_wanted,
        "name": b.name if b else None,
        "version": b.version if b else None,
        "library": b.library if b else None,
        "constant_time": b.constant_time if b else None,
        "unavailable": dict(_sm2_errors),
    }


def set_sm2_backend(name: str) -> str | None:
    """Use backend `name` (or `auto`) from now on; returns the previous one's name. Raises ImportError,
    OSError or ValueError when it cannot load (the current backend stays). Keys rebuild their handle."""
    global _sm2, _sm2_errors, _sm2_wanted
    prev = _sm2.name if _sm2 else None
    b = _sm2_loaded.get(name)
    if b is None:
        b, errors = select_backend(name)
        if b is None:
            raise ImportError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        _sm2_errors = errors
        _sm2_loaded[b.name] = b
    _sm2, _sm2_wanted = b, name
    return prev


class SM2PublicKey:
    """An SM2 public key (point on the curve); caches Z per user id."""

    __slots__ = ("_h", "_raw", "_z", "_zh")

    def __init__(self, raw64: bytes) -> None:
        if len(raw64) != 64:
            raise MalformedKey("SM2 public key must be 64 bytes x||y")
        x, y = int.from_bytes(raw64[:32], "big"), int.from_bytes(raw64[32:], "big")
        if not on_curve(x, y) or (x == 0 and y == 0):
            raise MalformedKey("SM2 public key is not a point on the curve")
        self._raw = bytes(raw64)
        self._z: dict[bytes, bytes] = {}
        self._zh: dict[bytes, hashes.Hash] = {}  # SM3 state after absorbing Z, per uid (copied per message)
        self._h: tuple[SM2Backend, Any] | None = None

    def _handle(self) -> tuple[SM2Backend, Any]:
        """The backend's form of this key, built on first use (again after a backend switch)."""
        b = _backend()
        h = self._h
        if h is None or h[0] is not b:
            h = self._h = (b, b.load_public(self._raw))
        return h

    @classmethod
    def from_bytes(cls, data: bytes) -> SM2PublicKey:
        """Accepts x||y (64), 04||x||y (65), compressed 02/03||x (33) or SubjectPublicKeyInfo DER."""
        data = bytes(data)
        if len(data) == 64:
            return cls(data)
        if len(data) == 65 and data[0] == 0x04:
            return cls(data[1:])
        if len(data) == 33 and data[0] in (2, 3):
            x = int.from_bytes(data[1:], "big")
            if x >= P:
                raise MalformedKey("SM2 public key: x out of range")
            return cls(data[1:] + decompress(data[0], x).to_bytes(32, "big"))
        if data.startswith(_SPKI_PREFIX) and len(data) == len(_SPKI_PREFIX) + 64:
            return cls(data[len(_SPKI_PREFIX) :])
        raise MalformedKey("unsupported SM2 public key encoding (want x||y, 04||x||y, 02/03||x or SPKI DER)")

    @classmethod
    def from_pem(cls, pem: str | bytes) -> SM2PublicKey:
        text = pem.decode() if isinstance(pem, bytes) else pem
        lines = [ln.strip() for ln in text.strip().splitlines()]
        if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
            raise MalformedKey("not a PEM PUBLIC KEY block")
        try:
            der = base64.b64decode("".join(lines[1:-1]), validate=True)
        except ValueError:
            raise MalformedKey("PEM body is not base64") from None
        return cls.from_bytes(der)

    def to_bytes(self, fmt: Literal["raw", "uncompressed", "compressed"] = "raw") -> bytes:
        if fmt == "raw":
            return self._raw
        if fmt == "uncompressed":
            return b"\x04" + self._raw
        return bytes([2 | (self._raw[-1] & 1)]) + self._raw[:32]

    def to_der(self) -> bytes:
        return _SPKI_PREFIX + self._raw

    def to_pem(self) -> str:
        return pem_encode("PUBLIC KEY", self.to_der())

    def fingerprint(self) -> str:
        """SM3 of the SPKI DER, hex (stable key id for logs; never reveals anything secret)."""
        return sm3(self.to_der()).hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SM2PublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"SM2PublicKey({self.fingerprint()[:16]})"

    def z(self, uid: bytes = DEFAULT_UID) -> bytes:
        """Z_A = SM3(ENTL || ID || a || b || xG || yG || xA || yA), cached per uid."""
        z = self._z.get(uid)
        if z is None:
            if len(uid) >= 8192:
                raise InvalidCryptoInput("SM2 user id must be shorter than 8192 bytes")
            if len(self._z) >= 64:  # bounded: callers with ever-changing ids do not grow memory
                self._z.clear()
            z = sm3((len(uid) * 8).to_bytes(2, "big") + uid + CURVE_BYTES + self._raw)
            self._z[uid] = z
        return z

    def digest(self, data: bytes | memoryview, uid: bytes = DEFAULT_UID) -> bytes:
        """e = SM3(Z || M): what SM2 actually signs (also what HSMs take for 'internal sign').
        Starts from a copy of the SM3 state that has absorbed Z (half the cost of a fresh hash)."""
        hz = self._zh.get(uid)
        if hz is None:
            z = self.z(uid)
            hz = hashes.Hash(hashes.SM3())
            hz.update(z)
            if len(self._zh) >= 64:
                self._zh.clear()
            self._zh[uid] = hz
        h = hz.copy()
        h.update(data)
        return h.finalize()

    def verify(
        self, data: bytes | memoryview, signature: bytes, uid: bytes = DEFAULT_UID, fmt: SigFormat = "der"
    ) -> bool:
        """True when `signature` is a valid SM2 signature of `data` (with Z for `uid`)."""
        return self.verify_digest(self.digest(data, uid), signature, fmt)

    def verify_digest(self, e: bytes, signature: bytes, fmt: SigFormat = "der") -> bool:
        if len(e) != 32:
            raise InvalidCryptoInput("SM2 digest must be 32 bytes")
        sig = bytes(signature)
        b, h = self._handle()
        if b.native_sig == "der":  # strict parse, then re-encode: what reaches the backend is canonical
            native = sig_raw_to_der(sig) if fmt == "raw" else sig_raw_to_der(sig_der_to_raw(sig))
        elif fmt == "raw":
            sig_raw_to_der(sig)  # length and range checks
            native = sig
        else:
            native = sig_der_to_raw(sig)
        return b.verify_digest(h, bytes(e), native)

    def encrypt(self, plaintext: bytes | memoryview, fmt: CtFormat = "der") -> bytes:
        """SM2 public-key encryption (C1C3C2; DER by default). 1..255 bytes: wrap bulk data with SM4."""
        n = len(plaintext)
        if not 1 <= n <= SM2_MAX_PLAINTEXT:
            raise InvalidCryptoInput(
                f"SM2 encrypts 1..{SM2_MAX_PLAINTEXT} bytes, got {n}; use an SM4 key for bulk data"
            )
        b, h = self._handle()
        out = b.encrypt(h, bytes(plaintext))
        if b.native_ct == "der":
            if fmt == "der":
                return out
            raw = ct_der_to_c1c3c2(out)
        else:
            raw = out
            if fmt == "der":
                return ct_c1c3c2_to_der(raw)
        return raw if fmt == "c1c3c2" else ct_c1c3c2_to_c1c2c3(raw)


class SM2PrivateKey:
    """An SM2 private key. `repr` never shows the secret."""

    __slots__ = ("_d", "_h", "public_key")

    def __init__(self, d32: bytes, public_key: SM2PublicKey | None = None) -> None:
        if len(d32) != 32:
            raise MalformedKey("SM2 private key must be 32 bytes")
        d = int.from_bytes(d32, "big")
        if not 1 <= d <= N - 2:
            raise MalformedKey("SM2 private key out of range")
        self._d = bytes(d32)
        if public_key is None:  # derived once, by the backend; stored keys carry it (keystore.py)
            public_key = SM2PublicKey(_backend().public_from_private(self._d))
        self.public_key = public_key
        self._h: tuple[SM2Backend, Any] | None = None

    def _handle(self) -> tuple[SM2Backend, Any]:
        b = _backend()
        h = self._h
        if h is None or h[0] is not b:
            h = self._h = (b, b.load_private(self._d, self.public_key.to_bytes()))
        return h

    @classmethod
    def generate(cls) -> SM2PrivateKey:
        """A fresh key pair from the backend's CSPRNG."""
        d, pub = _backend().generate()
        return cls(d, SM2PublicKey(pub))

    @classmethod
    def from_bytes(cls, d32: bytes) -> SM2PrivateKey:
        return cls(d32)

    def to_bytes(self) -> bytes:
        """The raw 32-byte secret: only for sealing into the keystore."""
        return self._d

    def __repr__(self) -> str:
        return f"SM2PrivateKey(public={self.public_key.fingerprint()[:16]})"

    def sign(self, data: bytes | memoryview, uid: bytes = DEFAULT_UID, fmt: SigFormat = "der") -> bytes:
        return self.sign_digest(self.public_key.digest(data, uid), fmt)

    def sign_digest(self, e: bytes, fmt: SigFormat = "der") -> bytes:
        if len(e) != 32:
            raise InvalidCryptoInput("SM2 digest must be 32 bytes")
        b, h = self._handle()
        sig = b.sign_digest(h, bytes(e))
        if b.native_sig == "der":
            return sig_der_to_raw(sig) if fmt == "raw" else sig
        return sig if fmt == "raw" else sig_raw_to_der(sig)

    def decrypt(self, ciphertext: bytes | memoryview, fmt: CtFormat = "der") -> bytes:
        """Inverse of `SM2PublicKey.encrypt`; a wrong C3 (tampering) raises DecryptionFailed."""
        ct = bytes(ciphertext)
        if fmt == "der":
            c1c3c2 = ct_der_to_c1c3c2(ct)  # strict validation; the backend gets a canonical encoding
        elif fmt == "c1c3c2":
            c1c3c2 = ct if ct[:1] == b"\x04" else b"\x04" + ct
        else:
            c1c3c2 = ct_c1c2c3_to_c1c3c2(ct)
        _, _, _, c2 = split_c1c3c2(c1c3c2)
        if len(c2) > SM2_MAX_PLAINTEXT:
            raise MalformedCiphertext(f"SM2 ciphertext body is longer than {SM2_MAX_PLAINTEXT} bytes")
        x, y = int.from_bytes(c1c3c2[1:33], "big"), int.from_bytes(c1c3c2[33:65], "big")
        if not on_curve(x, y):
            raise DecryptionFailed()
        b, h = self._handle()
        return b.decrypt(h, ct_c1c3c2_to_der(c1c3c2) if b.native_ct == "der" else c1c3c2)
