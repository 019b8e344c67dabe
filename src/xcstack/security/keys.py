"""Reaching the keys security signs with, inside the server and from the CLI / supervisor.

- In the server: the crypto capability's client (`ctx.services.crypto`), keys created on first use.
- Offline (CLI, supervisor before the HSM owner runs): the HSM owner if its socket answers, else the
  soft backend in process (`DirectClient`), else — no crypto at all — a local SM2 key file.
- Verification needs only public keys: `KeyVerifier` reads them from the keystore (state store),
  so `xcstack audit verify` works without the HSM owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xcstack.errors import XCError
from xcstack.security.signing import ServiceSigner, Signer, SoftSM2Signer, verify_sm2

if TYPE_CHECKING:
    from xcstack.config import Settings

log = logging.getLogger("xcstack.security")
LOCAL_PREFIX = "local:"


async def ensure_key(client: Any, name: str, kind: str) -> None:
    """Create `name` in the keystore unless it exists (several workers may race: 409 is fine)."""
    try:
        await client.public_key(name) if kind == "sm2" else await client.create_key(name, kind)
        return
    except XCError as exc:
        if exc.status == 409:
            return
        if exc.status != 404 and kind == "sm2":
            raise
    try:
        await client.create_key(name, kind)
    except XCError as exc:
        if exc.status != 409:
            raise


def local_key_path(data_dir: Path, name: str) -> Path:
    return data_dir / "security" / f"{name}.sm2"


def local_signer(data_dir: Path, name: str) -> SoftSM2Signer:
    """An SM2 key kept in a 0600 file: the fallback when there is no crypto capability at all."""
    path = local_key_path(data_dir, name)
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path}: must not be readable by group/others (chmod 600)")
        return SoftSM2Signer(LOCAL_PREFIX + name, bytes.fromhex(path.read_text().strip()))
    path.parent.mkdir(parents=True, exist_ok=True)
    signer = SoftSM2Signer(LOCAL_PREFIX + name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(signer._priv.hex())
    return signer


@contextlib.asynccontextmanager
async def offline_signer(settings: Settings) -> AsyncIterator[Signer]:
    """A signer for the CLI and the supervisor (see the module doc for the order of choices)."""
    name = settings.security.signing_key
    if not settings.crypto.enabled:
        yield local_signer(settings.data_dir, name)
        return
    from xcstack.crypto.client import DirectClient, OwnerClient
    from xcstack.crypto.owner import build_service, socket_path

    client: Any = None
    sock = socket_path(settings)
    if settings.crypto.access == "owner" and sock.exists():
        candidate = OwnerClient(sock, settings.crypto)
        try:
            await candidate.call("ping")
            client = candidate
        except Exception:
            await candidate.close()
    if client is None:
        if settings.crypto.backend != "soft":
            raise RuntimeError("the HSM owner is not running; start `xcstack serve` or run this on the server")
        store_holder: list[Any] = []

        async def factory() -> Any:
            svc = await build_service(settings)
            store_holder.append(svc.keystore.store)
            return svc

        client = DirectClient(factory)
    await client.start()
    try:
        await ensure_key(client, name, "sm2")
        yield ServiceSigner(client, name)
    finally:
        await client.close()


class KeyVerifier:
    """SM2 signature checks with public keys only: keystore keys (every active version) and local keys."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._keys: dict[str, list[bytes]] = {}

    async def public_keys(self, key_id: str) -> list[bytes]:
        if key_id in self._keys:
            return self._keys[key_id]
        keys: list[bytes] = []
        if key_id.startswith(LOCAL_PREFIX):
            path = local_key_path(self.settings.data_dir, key_id[len(LOCAL_PREFIX):])
            if path.exists():
                keys.append(SoftSM2Signer(key_id, bytes.fromhex(path.read_text().strip())).public_key)
        elif self.settings.crypto.enabled:
            from xcstack.crypto.keystore import Keystore
            from xcstack.state.store import StateStore

            url = self.settings.state.url.get_secret_value() if self.settings.state.url else None
            store = StateStore(url, self.settings.data_dir, pool_size=1)
            try:
                ks = Keystore(store, self.settings.crypto)
                await ks.init()
                with contextlib.suppress(XCError):
                    keys = [r.public_key for r in await ks.versions(key_id, fresh=True) if r.public_key]
            finally:
                await store.close()
        self._keys[key_id] = keys
        return keys

    async def __call__(self, key_id: str, message: bytes, signature: bytes) -> bool:
        """True when one of the key's public versions verifies; LookupError when none is known."""
        keys = await self.public_keys(key_id)
        if not keys:
            raise LookupError(key_id)
        return any(verify_sm2(k, message, signature) for k in keys)
