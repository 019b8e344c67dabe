"""SM2 public keys come from the backend, once, and are stored with the key: no Python curve arithmetic.

A private key imported without its public half gets d*G from the native backend; a keystore row written
without a public key (older keystores) gets it derived on first load and stored, so it is never computed
again.
"""

from __future__ import annotations

import pytest

from tests.crypto.test_sm import STD_D, STD_PUB
from xcstack.config import Settings
from xcstack.crypto.owner import build_service
from xcstack.crypto.primitives.sm2 import SM2PrivateKey, SM2PublicKey
from xcstack.crypto.primitives.sm2_backends import BACKEND_NAMES, load_backend
from xcstack.state.store import Tx


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_every_backend_derives_the_public_key(name: str) -> None:
    """GM/T 0003.5's example key, and fresh keys against the pair the backend itself generated."""
    try:
        backend = load_backend(name)
    except (ImportError, OSError) as exc:
        pytest.skip(f"SM2 backend {name} does not load here: {exc}")
    assert backend.public_from_private(STD_D) == STD_PUB
    for _ in range(3):
        d, pub = backend.generate()
        assert backend.public_from_private(d) == pub


def test_private_key_without_public_half_uses_the_backend() -> None:
    key = SM2PrivateKey.from_bytes(STD_D)
    assert key.public_key.to_bytes() == STD_PUB
    assert key.public_key.verify(b"m", key.sign(b"m"))


async def test_keystore_row_without_public_key_is_completed_on_first_load(settings: Settings) -> None:
    svc = await build_service(settings)
    try:
        rec = await svc.create_key("legacy", "sm2")
        assert rec.public_key is not None
        expected = rec.public_key

        def drop(tx: Tx) -> None:  # what a keystore written without public keys holds
            tx.execute("UPDATE crypto_keys SET public_key = NULL WHERE name = ?", ("legacy",))

        await svc.keystore.store.transaction(drop)
    finally:
        svc.close()
        await svc.keystore.store.close()

    svc = await build_service(settings)  # a restart on the old keystore
    try:
        info = (await svc.handle({"op": "public_key", "key": "legacy"}, memoryview(b"")))[0]["record"]
        assert info["public_key"] == expected.hex()
        _, sig = await svc.handle({"op": "sign", "key": "legacy"}, memoryview(b"doc"))
        assert SM2PublicKey.from_pem(info["pem"]).verify(b"doc", sig)
        row = await svc.keystore.store.fetchone("SELECT public_key FROM crypto_keys WHERE name = ?", ("legacy",))
        assert row is not None and bytes(row["public_key"]) == expected  # stored: derived once only
    finally:
        svc.close()
        await svc.keystore.store.close()
