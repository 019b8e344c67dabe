"""The signer interface security code signs with (audit checkpoints, the trusted-boot manifest).

Production signs with SM2 through the crypto capability's client (`ctx.services.crypto`, the HSM
owner); tests and the CLI without a running server use an in-process signer over the crypto
capability's SM2 adapter. Everything in `security/` takes a `Signer`, never a key.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

from xcstack.crypto.primitives.sm2 import SM2PrivateKey, SM2PublicKey


@runtime_checkable
class Signer(Protocol):
    key_id: str

    async def sign(self, data: bytes) -> bytes: ...

    async def verify(self, data: bytes, signature: bytes) -> bool: ...


class SoftSM2Signer:
    """An in-process SM2 signer. For tests and offline CLI use only (production: the HSM owner)."""

    def __init__(self, key_id: str = "soft-sm2", private_key: bytes | None = None, public_key: bytes | None = None):
        self.key_id = key_id
        self._key = SM2PrivateKey.from_bytes(private_key) if private_key else SM2PrivateKey.generate()
        self._priv = self._key.to_bytes()
        self.public = self._key.public_key
        self.public_key = self.public.to_bytes("raw")

    async def sign(self, data: bytes) -> bytes:
        return await asyncio.to_thread(self._key.sign, data)

    async def verify(self, data: bytes, signature: bytes) -> bool:
        return verify_sm2(self.public_key, data, signature)


def verify_sm2(public_key: bytes | str, data: bytes, signature: bytes) -> bool:
    """Verify a DER SM2 signature with a public key given as bytes (raw/SEC1/SPKI) or PEM."""
    try:
        key = SM2PublicKey.from_pem(public_key) if isinstance(public_key, str) else SM2PublicKey.from_bytes(public_key)
        return bool(key.verify(data, signature))
    except Exception:
        return False


class ServiceSigner:
    """Adapter over the crypto capability's client (`ctx.services.crypto`): `await client.sign(key, data)`,
    `await client.verify(key, data, signature)`."""

    def __init__(self, client: Any, key_id: str) -> None:
        self._client = client
        self.key_id = key_id

    async def sign(self, data: bytes) -> bytes:
        return bytes(await self._client.sign(self.key_id, data))

    async def verify(self, data: bytes, signature: bytes) -> bool:
        try:
            return bool(await self._client.verify(self.key_id, data, signature))
        except Exception:
            return False
