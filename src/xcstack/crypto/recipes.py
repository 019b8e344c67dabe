"""国密 recipes: what code outside `xcstack.crypto` uses (security: passwords, secrets at rest, tokens,
audit hashing; supply: digests). Each is a primitive put together the one safe way, so callers never
choose nonces, IVs or comparisons themselves.

    sm4_gcm_seal(key16, plaintext, aad) -> nonce||ciphertext||tag   /  sm4_gcm_open(key16, sealed, aad)
    hmac_sm3(key, data), hmac_sm3_verify(key, data, mac)           (constant-time check)
    pbkdf2_sm3(password, salt, iterations, length)                 (RFC 8018 with SM3 as the PRF)
    sm3(data), SM3()                                               (hashing needs no key: the primitive)
    random_bytes(n)                                                (the OS CSPRNG)

SM2 keys are the other public surface: `xcstack.crypto.primitives.sm2` (SM2PrivateKey, SM2PublicKey).
Errors are `xcstack.crypto.errors` classes (400s with stable codes).
"""

from __future__ import annotations

import hmac as _hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from xcstack.crypto.errors import InvalidCryptoInput, MalformedCiphertext
from xcstack.crypto.primitives.sm3 import SM3, sm3
from xcstack.crypto.primitives.sm4 import GCM_NONCE_SIZE, GCM_TAG_SIZE, sm4_gcm_decrypt, sm4_gcm_encrypt

__all__ = [
    "SM3",
    "hmac_sm3",
    "hmac_sm3_verify",
    "pbkdf2_sm3",
    "random_bytes",
    "sm3",
    "sm4_gcm_open",
    "sm4_gcm_seal",
]


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
