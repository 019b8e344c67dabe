"""SM3 (GB/T 32905) through `cryptography` (OpenSSL's implementation): one-shot and incremental.

A hash needs no key or backend choice, so this is what other packages import (via `xcstack.crypto.recipes`).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes


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
