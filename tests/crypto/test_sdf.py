"""SDF (GM/T 0018) backend over ctypes, against the software SDF library compiled from
tests/crypto/sdf_soft/softsdf.c (OpenSSL 3 SM2/SM3/SM4 underneath)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcstack.config import load_settings
from xcstack.crypto import sm
from xcstack.crypto.errors import (
    BackendError,
    DecryptionFailed,
    MalformedCiphertext,
    UnsupportedOperation,
)
from xcstack.crypto.owner import build_service
from xcstack.crypto.service import CryptoService

from .conftest import build_softsdf, sdf_crypto


async def _svc(data_dir: Path, softsdf: dict[str, str], **extra: object) -> CryptoService:
    return await build_service(load_settings(None, data_dir=data_dir, crypto=sdf_crypto(softsdf, **extra)))


async def _close(svc: CryptoService) -> None:
    svc.close()
    await svc.keystore.store.close()


async def op(svc: CryptoService, name: str, payload: bytes = b"", **meta: object) -> tuple[dict, bytes]:
    return await svc.handle({"op": name, **meta}, memoryview(payload))


async def test_sdf_sm2_sign_verify_interop(data_dir: Path, softsdf: dict[str, str]) -> None:
    svc = await _svc(data_dir, softsdf)
    try:
        rec = await svc.create_key("dev-signer", "sm2")
        assert rec.handle == "index:1" and rec.algorithm == "SM2"
        rec2 = await svc.create_key("dev-signer-2", "sm2")
        assert rec2.handle == "index:2"  # next free device index
        _, sig = await op(svc, "sign", b"document", key="dev-signer", uid=b"alice")
        assert (await op(svc, "verify", b"document", key="dev-signer", uid=b"alice", sig=sig))[0]["valid"]
        assert not (await op(svc, "verify", b"documenT", key="dev-signer", uid=b"alice", sig=sig))[0]["valid"]
        # the device's signature verifies with an independent SM2 implementation (gmalglib), Z included
        import gmalglib.sm2 as g

        pub = sm.SM2PublicKey.from_bytes(rec.public_key or b"")
        assert g.SM2(pk=pub.to_bytes("uncompressed"), uid=b"alice").verify(b"document", sm.sig_der_to_raw(sig))
        # and a signature made elsewhere with the same public key's private half is checked by the device
        other = sm.SM2PrivateKey.generate()
        forged = other.sign(b"document", uid=b"alice")
        assert not (await op(svc, "verify", b"document", key="dev-signer", uid=b"alice", sig=forged))[0]["valid"]
    finally:
        await _close(svc)


async def test_sdf_sm2_encrypt_decrypt_and_tamper(data_dir: Path, softsdf: dict[str, str]) -> None:
    svc = await _svc(data_dir, softsdf)
    try:
        await svc.create_key("dev-enc", "sm2")
        for fmt in ("der", "c1c3c2"):
            _, ct = await op(svc, "encrypt", b"session key bytes", key="dev-enc", fmt=fmt)
            assert (await op(svc, "decrypt", ct, key="dev-enc", fmt=fmt))[1] == b"session key bytes"
        _, raw = await op(svc, "encrypt", b"secret", key="dev-enc", fmt="c1c3c2")
        bad = bytearray(raw)
        bad[70] ^= 1  # inside C3
        with pytest.raises(DecryptionFailed):
            await op(svc, "decrypt", bytes(bad), key="dev-enc", fmt="c1c3c2")
        with pytest.raises(MalformedCiphertext):
            await op(svc, "decrypt", b"\x30\x03\x02\x01\x01", key="dev-enc")
    finally:
        await _close(svc)


async def test_sdf_sm4_kek_wrapped_keys_encrypt_then_mac(data_dir: Path, softsdf: dict[str, str]) -> None:
    svc = await _svc(data_dir, softsdf)
    try:
        rec = await svc.create_key("dev-sym", "sm4")
        assert rec.sealed and rec.handle == "kek:1"
        for size in (0, 1, 16, 1000):
            pt = sm.random_bytes(size)
            _, ct = await op(svc, "encrypt", pt, key="dev-sym", aad=b"hdr")
            assert (await op(svc, "decrypt", ct, key="dev-sym", aad=b"hdr"))[1] == pt
        _, ct = await op(svc, "encrypt", b"payload", key="dev-sym", aad=b"hdr")
        for i in (0, 20, len(ct) - 1):
            bad = bytearray(ct)
            bad[i] ^= 1
            with pytest.raises(DecryptionFailed):
                await op(svc, "decrypt", bytes(bad), key="dev-sym", aad=b"hdr")
        with pytest.raises(DecryptionFailed):
            await op(svc, "decrypt", ct, key="dev-sym", aad=b"other")
        with pytest.raises(MalformedCiphertext):
            await op(svc, "decrypt", b"x" * 40, key="dev-sym")
        with pytest.raises(UnsupportedOperation):
            await svc.create_key("dev-mac", "hmac-sm3")
        assert len((await op(svc, "random", n=48))[1]) == 48
    finally:
        await _close(svc)


async def test_sdf_keys_survive_restart(data_dir: Path, softsdf: dict[str, str]) -> None:
    svc = await _svc(data_dir, softsdf)
    await svc.create_key("persist-s", "sm2")
    await svc.create_key("persist-e", "sm4")
    _, sig = await op(svc, "sign", b"m", key="persist-s")
    _, ct = await op(svc, "encrypt", b"m", key="persist-e")
    await _close(svc)
    svc = await _svc(data_dir, softsdf)  # new device session: rights re-acquired, keys re-imported
    try:
        assert (await op(svc, "verify", b"m", key="persist-s", sig=sig))[0]["valid"]
        assert (await op(svc, "decrypt", ct, key="persist-e"))[1] == b"m"
        assert (await op(svc, "sign", b"m2", key="persist-s"))[0]["version"] == 1
    finally:
        await _close(svc)


async def test_sdf_wrong_password_is_clear_error(data_dir: Path, softsdf: dict[str, str]) -> None:
    svc = await _svc(data_dir, softsdf, key_password="wrong")
    try:
        await svc.create_key("pw-test", "sm2")
        with pytest.raises(BackendError, match="SDR_PARDENY"):
            await op(svc, "sign", b"x", key="pw-test")
    finally:
        await _close(svc)


async def test_sdf_narrow_256bit_vendor_layout(data_dir: Path, softsdf: dict[str, str]) -> None:
    lib = build_softsdf(Path(softsdf["build"]), max_bits=256)
    settings = load_settings(
        None, data_dir=data_dir,
        crypto={"backend": "sdf", "sdf": {"library": str(lib), "key_password": "device-pw", "ecc_max_bits": 256}},
    )
    svc = await build_service(settings)
    try:
        await svc.create_key("narrow", "sm2")
        _, sig = await op(svc, "sign", b"m", key="narrow")
        assert (await op(svc, "verify", b"m", key="narrow", sig=sig))[0]["valid"]
        _, ct = await op(svc, "encrypt", b"m", key="narrow")
        assert (await op(svc, "decrypt", ct, key="narrow"))[1] == b"m"
    finally:
        await _close(svc)


async def test_sdf_through_owner_process(data_dir: Path, softsdf: dict[str, str]) -> None:
    from xcstack.crypto.client import OwnerClient

    from .conftest import OwnerProc, owner_env

    env = owner_env(
        data_dir, XC_CRYPTO__BACKEND="sdf", XC_CRYPTO__SDF__LIBRARY=softsdf["library"],
        XC_CRYPTO__SDF__KEY_PASSWORD="device-pw", SOFTSDF_DIR=softsdf["SOFTSDF_DIR"],
        SOFTSDF_PASSWORD="device-pw",
    )
    owner = OwnerProc(data_dir, env)
    owner.start()
    c = OwnerClient(owner.sock, load_settings(None, data_dir=data_dir).crypto)
    try:
        await c.create_key("own-sdf", "sm2")
        sig = await c.sign("own-sdf", b"hello")
        assert await c.verify("own-sdf", b"hello", sig)
        with pytest.raises(UnsupportedOperation):
            await c.create_key("own-mac", "hmac-sm3")
    finally:
        await c.close()
        owner.stop()
