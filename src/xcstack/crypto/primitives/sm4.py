"""SM4 (GB/T 32907) block cipher modes through `cryptography`: CBC (PKCS#7), CTR and GCM, 16-byte keys.

Raw modes with caller-chosen IVs and nonces; the random-nonce sealing form is a recipe
(`xcstack.crypto.recipes.sm4_gcm_seal`).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as _padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from xcstack.crypto.errors import DecryptionFailed, InvalidCryptoInput, MalformedCiphertext

SM4_KEY_SIZE = 16
GCM_TAG_SIZE = 16
GCM_NONCE_SIZE = 12


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
