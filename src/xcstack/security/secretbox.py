"""Secrets at rest (upstream API keys, DB passwords, TOTP secrets): SM4-GCM.

`SecretBox.seal(plaintext, aad) -> bytes` / `open(sealed, aad) -> bytearray`. In production the
SM4 key lives in the keystore and never enters the http worker: `ServiceSecretBox` calls the crypto
capability's client (`await client.encrypt(key, plaintext, aad=...)` / `decrypt`). `LocalSecretBox`
does SM4-GCM in process with a 16-byte key (tests; and the fallback when the crypto capability
is disabled: the key is then derived from the crypto master key with HMAC-SM3).

The AAD binds each value to where it belongs (e.g. `b"totp:<user id>"`), so a sealed value cannot
be moved to another user or field. Sealed format: b"xs1" + nonce(12) + ciphertext + tag(16).

Zeroing: `open` returns a bytearray, and `zero(buf)` overwrites it in place; callers zero it when
done. Limits (documented in docs/security.md): Python `str` and `bytes` are immutable and may be
copied by the interpreter (decoding to str for pyotp, HTTP headers to upstreams), so a secret that
has to become a `str` cannot be reliably wiped; the GC frees but does not clear memory.
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

from xcstack.crypto.recipes import sm4_gcm_open, sm4_gcm_seal

MAGIC = b"xs1"


class SecretBox(Protocol):
    async def seal(self, plaintext: bytes | bytearray, aad: bytes) -> bytes: ...

    async def open(self, sealed: bytes, aad: bytes) -> bytearray: ...


def zero(buf: bytearray | memoryview) -> None:
    """Overwrite a mutable buffer in place."""
    n = len(buf)
    if n:
        view = memoryview(buf).cast("B")
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(view)), 0, n)


class LocalSecretBox:
    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != 16:
            raise ValueError("SM4 key must be 16 bytes")
        self._key = bytearray(key)

    async def seal(self, plaintext: bytes | bytearray, aad: bytes) -> bytes:
        return MAGIC + sm4_gcm_seal(bytes(self._key), bytes(plaintext), aad)

    async def open(self, sealed: bytes, aad: bytes) -> bytearray:
        if not sealed.startswith(MAGIC):
            raise ValueError("not a sealed secret")
        return bytearray(sm4_gcm_open(bytes(self._key), sealed[len(MAGIC) :], aad))

    def close(self) -> None:
        zero(self._key)


class ServiceSecretBox:
    """SM4-GCM through the crypto client; `key` names an SM4 key in the keystore."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key

    async def seal(self, plaintext: bytes | bytearray, aad: bytes) -> bytes:
        return MAGIC + bytes(await self.client.encrypt(self.key, bytes(plaintext), aad=aad))

    async def open(self, sealed: bytes, aad: bytes) -> bytearray:
        if not sealed.startswith(MAGIC):
            raise ValueError("not a sealed secret")
        return bytearray(await self.client.decrypt(self.key, sealed[len(MAGIC) :], aad=aad))
