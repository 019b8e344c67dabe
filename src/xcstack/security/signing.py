"""The signer interface security code signs with (audit checkpoints, the trusted-boot manifest).

Production signs with SM2 through the crypto capability's client (`ctx.get("crypto")`, the HSM
owner); tests and the CLI without a running server use an in-process signer. Everything in
`security/` takes a `Signer`, never a key.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Signer(Protocol):
    key_id: str

    async def sign(self, data: bytes) -> bytes: ...

    async def verify(self, data: bytes, signature: bytes) -> bool: ...


class SoftSM2Signer:
    """An in-process SM2 signer (GmSSL through gmssl-pyx). For tests and offline CLI use only."""

    def __init__(self, key_id: str = "soft-sm2", private_key: bytes | None = None, public_key: bytes | None = None):
        import gmssl_pyx

        self.key_id = key_id
        if private_key is None or public_key is None:
            public_key, private_key = gmssl_pyx.sm2_key_generate()
        self._priv = bytes(private_key)
        self.public_key = bytes(public_key)

    async def sign(self, data: bytes) -> bytes:
        import gmssl_pyx

        return bytes(await asyncio.to_thread(gmssl_pyx.sm2_sign, self._priv, self.public_key, data))

    async def verify(self, data: bytes, signature: bytes) -> bool:
        return verify_sm2(self.public_key, data, signature)


def verify_sm2(public_key: bytes, data: bytes, signature: bytes) -> bool:
    import gmssl_pyx

    try:
        return bool(gmssl_pyx.sm2_verify(public_key, data, signature))
    except Exception:
        return False


class ServiceSigner:
    """Adapter over the crypto capability's client: `await client.sign(key_id, data)` and
    `await client.verify(key_id, data, signature)`."""

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
