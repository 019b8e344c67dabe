"""国密 algorithm adapters: SM3, SM4 (via `cryptography`) and SM2 (via a backend chosen at import), one small API.

This module is the stable surface other capabilities use (security: password hashing, secrets at
rest, audit checkpoints). Everything here is synchronous, thread-safe and free of I/O.

SM3
    `sm3(data)`, `SM3()` (incremental), `hmac_sm3(key, data)`, `hmac_sm3_verify(key, data, mac)`,
    `pbkdf2_sm3(password, salt, iterations, length)`.
SM4 (16-byte keys)
    `sm4_cbc_encrypt/decrypt(key, iv, data, padding=True)` (PKCS#7), `sm4_ctr(key, counter16, data)`,
    `sm4_gcm_encrypt(key, nonce, plaintext, aad) -> ciphertext||tag`, `sm4_gcm_decrypt(...)`,
    `sm4_gcm_seal(key, plaintext, aad) -> nonce||ciphertext||tag` / `sm4_gcm_open(...)` (random 12-byte
    nonce: the convenient form for secrets at rest).
SM2
    `SM2PrivateKey.generate()`, `.from_bytes(d32)`, `.sign(data, uid=..., fmt="der"|"raw")`,
    `.decrypt(ct, fmt="der"|"c1c3c2"|"c1c2c3")`; `SM2PublicKey.from_bytes(raw64 | 04||x||y | 02/03||x |
    SPKI DER)`, `.from_pem`, `.verify(data, sig, uid=..., fmt="der"|"raw") -> bool`, `.encrypt(pt, fmt)`,
    `.to_pem()`. Z = SM3(ENTL||ID||a||b||xG||yG||xA||yA) is computed once per (key, user id) and cached,
    so a signature costs one SM3 over the message plus one scalar multiplication.
    Conversions: `sig_der_to_raw` / `sig_raw_to_der`, `ct_der_to_c1c3c2` / `ct_c1c3c2_to_der`,
    `ct_c1c2c3_to_c1c3c2` / `ct_c1c3c2_to_c1c2c3`.
    The scalar arithmetic comes from a backend (`sm2_backends.py`): `XC_SM2_BACKEND=auto` (default:
    the system OpenSSL 3 libcrypto, else gmssl-pyx, else gmalglib) or one name. `sm2_backend_info()`
    says which one runs and why the others did not load. Encodings, range checks, Z and the digest are
    computed here, so every backend gets the same validated input and gives the same answers.

Errors are `xcstack.crypto.errors` classes (400s with stable codes): malformed input raises
`MalformedSignature` / `MalformedCiphertext` / `MalformedKey` / `InvalidCryptoInput`; a signature that
does not verify returns False; a ciphertext that fails authentication raises `DecryptionFailed`;
SM2 with no backend loaded raises `CryptoUnavailable` (SM3/SM4 still work).

Never the pure-Python `gmssl` package: it draws signing nonces from `random` and skips the C3 check.
"""

from __future__ import annotations

import base64
import hmac as _hmac
import os
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives import padding as _padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from xcstack.crypto.errors import (
    CryptoUnavailable,
    DecryptionFailed,
    InvalidCryptoInput,
    MalformedCiphertext,
    MalformedKey,
    MalformedSignature,
)
from xcstack.crypto.sm2_backends import SM2Backend, select_backend

__all__ = [
    "DEFAULT_UID",
    "SM2_MAX_PLAINTEXT",
    "SM3",
    "SM2PrivateKey",
    "SM2PublicKey",
    "ct_c1c2c3_to_c1c3c2",
    "ct_c1c3c2_to_c1c2c3",
    "ct_c1c3c2_to_der",
    "ct_der_to_c1c3c2",
    "hmac_sm3",
    "hmac_sm3_verify",
    "pbkdf2_sm3",
    "random_bytes",
    "set_sm2_backend",
    "sig_der_to_raw",
    "sig_raw_to_der",
    "sm2_backend_info",
    "sm3",
    "sm4_cbc_decrypt",
    "sm4_cbc_encrypt",
    "sm4_ctr",
    "sm4_gcm_decrypt",
    "sm4_gcm_encrypt",
    "sm4_gcm_open",
    "sm4_gcm_seal",
]

SigFormat = Literal["der", "raw"]
CtFormat = Literal["der", "c1c3c2", "c1c2c3"]

DEFAULT_UID = b"1234567812345678"  # GM/T 0009 default user id
SM2_MAX_PLAINTEXT = 255  # one limit on every backend (GmSSL's): SM2 encryption is for small secrets, SM4 for bulk
SM4_KEY_SIZE = 16
GCM_TAG_SIZE = 16
GCM_NONCE_SIZE = 12

# SM2 curve (GM/T 0003.5)
P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0
_CURVE_BYTES = b"".join(v.to_bytes(32, "big") for v in (A, B, GX, GY))

# SubjectPublicKeyInfo prefix: id-ecPublicKey + curve sm2 (1.2.156.10197.1.301), uncompressed point
_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a811ccf5501822d03420004")


# ---------------------------------------------------------------------------------------------
# SM3
# ---------------------------------------------------------------------------------------------
class SM3:
    """Incremental SM3: `h = SM3(); h.update(a); h.update(b); h.digest()`."""

    digest_size = 32
    block_size = 64

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._h = hashes.Hash(hashes.SM3())
        if data:
            self._h.update(data)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def copy(self) -> SM3:
        other = SM3.__new__(SM3)
        other._h = self._h.copy()
        return other

    def digest(self) -> bytes:
        return self._h.copy().finalize()

    def hexdigest(self) -> str:
        return self.digest().hex()


def sm3(data: bytes | memoryview) -> bytes:
    """SM3 digest (32 bytes)."""
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def hmac_sm3(key: bytes, data: bytes | memoryview) -> bytes:
    """HMAC-SM3 (32 bytes)."""
    if not key:
        raise InvalidCryptoInput("HMAC key must not be empty")
    h = _chmac.HMAC(key, hashes.SM3())
    h.update(data)
    return h.finalize()


def hmac_sm3_verify(key: bytes, data: bytes | memoryview, mac: bytes) -> bool:
    """Constant-time check of an HMAC-SM3 tag."""
    return _hmac.compare_digest(hmac_sm3(key, data), bytes(mac))


def pbkdf2_sm3(password: bytes | str, salt: bytes, iterations: int, length: int = 32) -> bytes:
    """PBKDF2-HMAC-SM3 (RFC 8018 with SM3 as the PRF)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if iterations < 1 or not 1 <= length <= 1024:
        raise InvalidCryptoInput("pbkdf2: iterations must be >= 1 and length 1..1024")
    return PBKDF2HMAC(hashes.SM3(), length, salt, iterations).derive(password)


def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes (the OS CSPRNG)."""
    return os.urandom(n)


# ---------------------------------------------------------------------------------------------
# SM4
# ---------------------------------------------------------------------------------------------
def _sm4_key(key: bytes) -> algorithms.SM4:
    if len(key) != SM4_KEY_SIZE:
        raise InvalidCryptoInput(f"SM4 key must be 16 bytes, got {len(key)}")
    return algorithms.SM4(key)


def sm4_cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes | memoryview, padding: bool = True) -> bytes:
    """SM4-CBC; PKCS#7 padding unless `padding=False` (then the length must be a multiple of 16)."""
    if len(iv) != 16:
        raise InvalidCryptoInput("SM4-CBC IV must be 16 bytes")
    data = bytes(plaintext)
    if padding:
        p = _padding.PKCS7(128).padder()
        data = p.update(data) + p.finalize()
    elif len(data) % 16:
        raise InvalidCryptoInput("SM4-CBC without padding needs a multiple of 16 bytes")
    enc = Cipher(_sm4_key(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def sm4_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes | memoryview, padding: bool = True) -> bytes:
    """Inverse of `sm4_cbc_encrypt`. Bad padding raises DecryptionFailed (CBC has no integrity:
    pair it with HMAC-SM3 or use GCM when tampering matters)."""
    if len(iv) != 16:
        raise InvalidCryptoInput("SM4-CBC IV must be 16 bytes")
    if not len(ciphertext) or len(ciphertext) % 16:
        raise MalformedCiphertext("SM4-CBC ciphertext must be a non-empty multiple of 16 bytes")
    dec = Cipher(_sm4_key(key), modes.CBC(iv)).decryptor()
    data = dec.update(ciphertext) + dec.finalize()
    if not padding:
        return data
    u = _padding.PKCS7(128).unpadder()
    try:
        return u.update(data) + u.finalize()
    except ValueError:
        raise DecryptionFailed() from None


def sm4_ctr(key: bytes, counter: bytes, data: bytes | memoryview) -> bytes:
    """SM4-CTR with a 16-byte initial counter block; encryption and decryption are the same."""
    if len(counter) != 16:
        raise InvalidCryptoInput("SM4-CTR counter block must be 16 bytes")
    c = Cipher(_sm4_key(key), modes.CTR(counter)).encryptor()
    return c.update(data) + c.finalize()


sm4_ctr_encrypt = sm4_ctr
sm4_ctr_decrypt = sm4_ctr


def sm4_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes | memoryview, aad: bytes = b"") -> bytes:
    """SM4-GCM: returns ciphertext || 16-byte tag. The nonce (12 bytes recommended) must never repeat
    under one key."""
    if not 8 <= len(nonce) <= 64:
        raise InvalidCryptoInput("SM4-GCM nonce must be 8..64 bytes (12 recommended)")
    enc = Cipher(_sm4_key(key), modes.GCM(nonce)).encryptor()
    if aad:
        enc.authenticate_additional_data(aad)
    out = enc.update(plaintext) + enc.finalize()
    return out + enc.tag


def sm4_gcm_decrypt(key: bytes, nonce: bytes, data: bytes | memoryview, aad: bytes = b"") -> bytes:
    """Inverse of `sm4_gcm_encrypt`; DecryptionFailed when the tag does not match."""
    if not 8 <= len(nonce) <= 64:
        raise InvalidCryptoInput("SM4-GCM nonce must be 8..64 bytes (12 recommended)")
    if len(data) < GCM_TAG_SIZE:
        raise MalformedCiphertext("SM4-GCM ciphertext is shorter than its tag")
    mv = memoryview(data)
    dec = Cipher(_sm4_key(key), modes.GCM(nonce, bytes(mv[-GCM_TAG_SIZE:]))).decryptor()
    if aad:
        dec.authenticate_additional_data(aad)
    try:
        return dec.update(mv[:-GCM_TAG_SIZE]) + dec.finalize()
    except InvalidTag:
        raise DecryptionFailed() from None


def sm4_gcm_seal(key: bytes, plaintext: bytes | memoryview, aad: bytes = b"") -> bytes:
    """SM4-GCM with a fresh random 12-byte nonce: returns nonce || ciphertext || tag."""
    nonce = os.urandom(GCM_NONCE_SIZE)
    return nonce + sm4_gcm_encrypt(key, nonce, plaintext, aad)


def sm4_gcm_open(key: bytes, sealed: bytes | memoryview, aad: bytes = b"") -> bytes:
    """Inverse of `sm4_gcm_seal`."""
    if len(sealed) < GCM_NONCE_SIZE + GCM_TAG_SIZE:
        raise MalformedCiphertext("sealed SM4-GCM data is too short")
    mv = memoryview(sealed)
    return sm4_gcm_decrypt(key, bytes(mv[:GCM_NONCE_SIZE]), mv[GCM_NONCE_SIZE:], aad)


# ---------------------------------------------------------------------------------------------
# Minimal strict DER (only what SM2 signatures and ciphertexts need)
# ---------------------------------------------------------------------------------------------
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")  # leading 0 when the top bit is set
    return _der_tlv(0x02, body)


class _DerError(ValueError):
    pass


def _der_read(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos + 2 > len(buf) or buf[pos] != tag:
        raise _DerError("unexpected tag")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        nbytes = first & 0x7F
        if nbytes == 0 or nbytes > 2 or pos + nbytes > len(buf):
            raise _DerError("bad length")
        length = int.from_bytes(buf[pos : pos + nbytes], "big")
        if length < 0x80 or (nbytes == 2 and length < 0x100):
            raise _DerError("non-minimal length")
        pos += nbytes
    if pos + length > len(buf):
        raise _DerError("truncated")
    return buf[pos : pos + length], pos + length


def _der_read_uint(buf: bytes, pos: int) -> tuple[int, int]:
    body, pos = _der_read(buf, pos, 0x02)
    if not body or body[0] & 0x80:
        raise _DerError("negative or empty integer")
    if len(body) > 1 and body[0] == 0 and not body[1] & 0x80:
        raise _DerError("non-minimal integer")
    return int.from_bytes(body, "big"), pos


# ---------------------------------------------------------------------------------------------
# SM2 encodings
# ---------------------------------------------------------------------------------------------
def _sig_int(b: bytes) -> bool:
    """A DER INTEGER body that is positive and minimally encoded."""
    return bool(b) and not b[0] & 0x80 and not (len(b) > 1 and b[0] == 0 and not b[1] & 0x80)


def sig_der_to_raw(der: bytes, n: int = N) -> bytes:
    """DER SEQUENCE{r, s} -> 64-byte r||s (`n`: the curve order; SM2 by default, any 256-bit curve).
    Strict: a 256-bit signature is at most 72 bytes, so every length is short-form."""
    d = bytes(der)
    size = len(d)
    if not 8 <= size <= 72 or d[0] != 0x30 or d[1] != size - 2 or d[2] != 0x02:
        raise MalformedSignature("signature is not valid DER SEQUENCE{r, s}")
    lr = d[3]
    p = 4 + lr
    if not 1 <= lr <= 33 or p + 2 > size or d[p] != 0x02:
        raise MalformedSignature("signature is not valid DER SEQUENCE{r, s}")
    ls = d[p + 1]
    if not 1 <= ls <= 33 or p + 2 + ls != size:
        raise MalformedSignature("signature is not valid DER SEQUENCE{r, s}")
    rb, sb = d[4:p], d[p + 2 :]
    if not (_sig_int(rb) and _sig_int(sb)):
        raise MalformedSignature("signature integers are negative or not minimally encoded")
    r, s = int.from_bytes(rb, "big"), int.from_bytes(sb, "big")
    if not (0 < r < n and 0 < s < n):
        raise MalformedSignature("signature r or s is out of range")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _der_uint32(b: bytes) -> bytes:
    b = b.lstrip(b"\0") or b"\0"
    if b[0] & 0x80:
        b = b"\0" + b
    return b"\x02" + bytes([len(b)]) + b


def sig_raw_to_der(raw: bytes, n: int = N) -> bytes:
    """64-byte r||s -> DER SEQUENCE{r, s}."""
    if len(raw) != 64:
        raise MalformedSignature(f"raw signature must be 64 bytes (r||s), got {len(raw)}")
    raw = bytes(raw)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    if not (0 < r < n and 0 < s < n):
        raise MalformedSignature("signature r or s is out of range")
    body = _der_uint32(raw[:32]) + _der_uint32(raw[32:])
    return b"\x30" + bytes([len(body)]) + body


def ct_der_to_c1c3c2(der: bytes) -> bytes:
    """GM/T 0009 DER SEQUENCE{x, y, hash, ciphertext} -> 04||x||y || C3 || C2."""
    try:
        body, end = _der_read(bytes(der), 0, 0x30)
        if end != len(der):
            raise _DerError("trailing data")
        x, pos = _der_read_uint(body, 0)
        y, pos = _der_read_uint(body, pos)
        c3, pos = _der_read(body, pos, 0x04)
        c2, pos = _der_read(body, pos, 0x04)
        if pos != len(body):
            raise _DerError("trailing data in sequence")
    except _DerError as exc:
        raise MalformedCiphertext(f"SM2 ciphertext is not valid DER: {exc}") from None
    if len(c3) != 32 or not c2 or x >= P or y >= P:
        raise MalformedCiphertext("SM2 ciphertext fields out of range")
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big") + c3 + c2


def _split_c1c3c2(raw: bytes) -> tuple[int, int, bytes, bytes]:
    if len(raw) >= 1 and raw[0] == 0x04:
        raw = raw[1:]
    if len(raw) < 64 + 32 + 1:
        raise MalformedCiphertext("SM2 ciphertext is too short (C1 64 + C3 32 + C2 >= 1 bytes)")
    x, y = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")
    return x, y, raw[64:96], raw[96:]


def ct_c1c3c2_to_der(raw: bytes) -> bytes:
    """(04||)x||y || C3 || C2 -> GM/T 0009 DER."""
    x, y, c3, c2 = _split_c1c3c2(bytes(raw))
    body = _der_int(x) + _der_int(y) + _der_tlv(0x04, c3) + _der_tlv(0x04, c2)
    return _der_tlv(0x30, body)


def ct_c1c2c3_to_c1c3c2(raw: bytes) -> bytes:
    """Old (2010 draft) order C1||C2||C3 -> C1||C3||C2 (both with the 04 prefix)."""
    raw = bytes(raw)
    if raw[:1] == b"\x04":
        raw = raw[1:]
    if len(raw) < 64 + 32 + 1:
        raise MalformedCiphertext("SM2 ciphertext is too short")
    return b"\x04" + raw[:64] + raw[-32:] + raw[64:-32]


def ct_c1c3c2_to_c1c2c3(raw: bytes) -> bytes:
    x, y, c3, c2 = _split_c1c3c2(bytes(raw))
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big") + c2 + c3


def _on_curve(x: int, y: int) -> bool:
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x + A * x + B)) % P == 0


def _decompress(prefix: int, x: int) -> int:
    rhs = (x * x * x + A * x + B) % P
    y = pow(rhs, (P + 1) // 4, P)  # P % 4 == 3
    if y * y % P != rhs:
        raise MalformedKey("SM2 public key: x is not on the curve")
    if (y & 1) != (prefix & 1):
        y = P - y
    return y


def _pem(label: str, der: bytes) -> str:
    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


# ---------------------------------------------------------------------------------------------
# SM2 backend (chosen once at import; `set_sm2_backend` switches it for tests and benchmarks)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# SM2 keys
# ---------------------------------------------------------------------------------------------
class SM2PublicKey:
    """An SM2 public key (point on the curve); caches Z per user id."""

    __slots__ = ("_h", "_raw", "_z", "_zh")

    def __init__(self, raw64: bytes) -> None:
        if len(raw64) != 64:
            raise MalformedKey("SM2 public key must be 64 bytes x||y")
        x, y = int.from_bytes(raw64[:32], "big"), int.from_bytes(raw64[32:], "big")
        if not _on_curve(x, y) or (x == 0 and y == 0):
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
            return cls(data[1:] + _decompress(data[0], x).to_bytes(32, "big"))
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
        return _pem("PUBLIC KEY", self.to_der())

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
            z = sm3((len(uid) * 8).to_bytes(2, "big") + uid + _CURVE_BYTES + self._raw)
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
        if public_key is None:
            public_key = SM2PublicKey(_public_from_private(self._d))
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
        _, _, _, c2 = _split_c1c3c2(c1c3c2)
        if len(c2) > SM2_MAX_PLAINTEXT:
            raise MalformedCiphertext(f"SM2 ciphertext body is longer than {SM2_MAX_PLAINTEXT} bytes")
        x, y = int.from_bytes(c1c3c2[1:33], "big"), int.from_bytes(c1c3c2[33:65], "big")
        if not _on_curve(x, y):
            raise DecryptionFailed()
        b, h = self._handle()
        return b.decrypt(h, ct_c1c3c2_to_der(c1c3c2) if b.native_ct == "der" else c1c3c2)


def _public_from_private(d: bytes) -> bytes:
    """Q = d*G in affine coordinates (Jacobian arithmetic on Python ints; used only when a key is
    imported without its public half, so speed does not matter)."""
    k = int.from_bytes(d, "big")

    def add(p1: tuple[int, int, int], p2: tuple[int, int, int]) -> tuple[int, int, int]:
        x1, y1, z1 = p1
        x2, y2, z2 = p2
        if z1 == 0:
            return p2
        if z2 == 0:
            return p1
        z1z1, z2z2 = z1 * z1 % P, z2 * z2 % P
        u1, u2 = x1 * z2z2 % P, x2 * z1z1 % P
        s1, s2 = y1 * z2 * z2z2 % P, y2 * z1 * z1z1 % P
        if u1 == u2:
            if s1 != s2:
                return (1, 1, 0)
            return dbl(p1)
        h, r = (u2 - u1) % P, (s2 - s1) % P
        h2 = h * h % P
        h3 = h * h2 % P
        x3 = (r * r - h3 - 2 * u1 * h2) % P
        y3 = (r * (u1 * h2 - x3) - s1 * h3) % P
        return (x3, y3, h * z1 * z2 % P)

    def dbl(p1: tuple[int, int, int]) -> tuple[int, int, int]:
        x1, y1, z1 = p1
        if z1 == 0 or y1 == 0:
            return (1, 1, 0)
        ysq = y1 * y1 % P
        s = 4 * x1 * ysq % P
        z4 = pow(z1, 4, P)
        m = (3 * x1 * x1 + A * z4) % P
        x3 = (m * m - 2 * s) % P
        y3 = (m * (s - x3) - 8 * ysq * ysq) % P
        return (x3, y3, 2 * y1 * z1 % P)

    acc: tuple[int, int, int] = (1, 1, 0)
    base: tuple[int, int, int] = (GX, GY, 1)
    while k:
        if k & 1:
            acc = add(acc, base)
        base = dbl(base)
        k >>= 1
    x, y, z = acc
    zi = pow(z, -1, P)
    zi2 = zi * zi % P
    return (x * zi2 % P).to_bytes(32, "big") + (y * zi2 * zi % P).to_bytes(32, "big")
