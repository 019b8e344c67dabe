"""Keystore, master key handling, rotation and the op dispatcher (soft backend, in-process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xcstack.config import ConfigError
from xcstack.crypto import sm
from xcstack.crypto.errors import (
    DecryptionFailed,
    InputTooLarge,
    InvalidCryptoInput,
    KeyExists,
    KeyNotFound,
    MalformedCiphertext,
    MalformedSignature,
    WrongKeyType,
)
from xcstack.crypto.keystore import MasterKeyError, load_master_key, master_key_path
from xcstack.crypto.owner import build_service
from xcstack.crypto.service import CryptoService

from .conftest import MASTER_HEX, make_settings


async def op(svc: CryptoService, name: str, payload: bytes = b"", **meta: object) -> tuple[dict, bytes]:
    return await svc.handle({"op": name, **meta}, memoryview(payload))


# ---- master key ---------------------------------------------------------------------------------
def test_master_key_file_created_0600_and_reused(data_dir: Path) -> None:
    s = make_settings(data_dir).crypto
    k1 = load_master_key(s, data_dir)
    path = master_key_path(s, data_dir)
    assert len(k1) == 16 and (path.stat().st_mode & 0o777) == 0o600
    assert load_master_key(s, data_dir) == k1


def test_master_key_file_with_loose_permissions_is_refused(data_dir: Path) -> None:
    s = make_settings(data_dir).crypto
    load_master_key(s, data_dir)
    path = master_key_path(s, data_dir)
    os.chmod(path, 0o644)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        load_master_key(s, data_dir)


def test_master_key_missing_without_create(data_dir: Path) -> None:
    s = make_settings(data_dir, create_master_key=False).crypto
    with pytest.raises(MasterKeyError, match="does not exist"):
        load_master_key(s, data_dir)


def test_master_key_from_env(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XC_CRYPTO__MASTER_KEY", MASTER_HEX)
    from xcstack.config import load_settings

    s = load_settings(None, data_dir=data_dir).crypto
    assert load_master_key(s, data_dir) == bytes.fromhex(MASTER_HEX)
    assert not master_key_path(s, data_dir).exists()


def test_bad_master_key_config_names_key_not_value(data_dir: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        make_settings(data_dir, master_key="not-a-key-zzzz")
    assert "crypto.master_key" in str(ei.value) and "zzzz" not in str(ei.value)


def test_direct_access_needs_soft_backend(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="direct"):
        make_settings(data_dir, backend="sdf", access="direct", sdf={"library": "/bin/sh"})


async def test_wrong_master_key_detected_at_start(data_dir: Path) -> None:
    svc = await build_service(make_settings(data_dir, master_key=MASTER_HEX))
    await svc.create_key("k", "sm4")
    svc.close()
    await svc.keystore.store.close()
    with pytest.raises(MasterKeyError, match="does not match"):
        await build_service(make_settings(data_dir, master_key="ffeeddccbbaa99887766554433221100"))


async def test_sealed_keys_are_not_plaintext_in_db(service: CryptoService, data_dir: Path) -> None:
    rec = await service.create_key("hm", "hmac-sm3")
    assert rec.sealed is not None
    secret = service.backend._secret(rec)  # type: ignore[attr-defined]
    assert isinstance(secret, bytes)
    assert secret not in (data_dir / "state.db").read_bytes()


# ---- keys and rotation --------------------------------------------------------------------------
async def test_create_list_rotate(service: CryptoService) -> None:
    await service.create_key("signer", "sm2")
    with pytest.raises(KeyExists):
        await service.create_key("signer", "sm2")
    r2 = await service.create_key("signer", "", rotate=True)
    assert r2.version == 2 and r2.kind == "sm2"
    keys = (await op(service, "list_keys"))[0]["keys"]
    assert [(k["name"], k["version"], k["versions"]) for k in keys] == [("signer", 2, 2)]
    with pytest.raises(KeyNotFound):
        await service.create_key("nope", "", rotate=True)
    with pytest.raises(InvalidCryptoInput):
        await service.create_key("bad name!", "sm2")
    with pytest.raises(InvalidCryptoInput):
        await service.create_key("x", "rsa")


async def test_rotation_keeps_old_versions_for_verify_and_decrypt(service: CryptoService) -> None:
    await service.create_key("s", "sm2")
    await service.create_key("e", "sm4")
    m1, sig1 = await op(service, "sign", b"doc", key="s")
    _, ct1 = await op(service, "encrypt", b"secret", key="e", aad=b"a")
    await service.create_key("s", "", rotate=True)
    await service.create_key("e", "", rotate=True)
    m2, sig2 = await op(service, "sign", b"doc", key="s")
    assert (m1["version"], m2["version"]) == (1, 2)
    assert (await op(service, "verify", b"doc", key="s", sig=sig1))[0] == {"key": "s", "valid": True, "version": 1}
    assert (await op(service, "verify", b"doc", key="s", sig=sig2))[0]["version"] == 2
    # pinned to the wrong version: invalid
    assert (await op(service, "verify", b"doc", key="s", sig=sig1, version=2))[0]["valid"] is False
    m, pt = await op(service, "decrypt", ct1, key="e", aad=b"a")
    assert pt == b"secret" and m["version"] == 1
    m, _ = await op(service, "encrypt", b"x", key="e")
    assert m["version"] == 2


async def test_public_key_export_matches_signatures(service: CryptoService) -> None:
    await service.create_key("s", "sm2")
    info = (await op(service, "public_key", key="s"))[0]["record"]
    pub = sm.SM2PublicKey.from_pem(info["pem"])
    _, sig = await op(service, "sign", b"m", key="s", uid=b"alice")
    assert pub.verify(b"m", sig, uid=b"alice")
    _, raw = await op(service, "sign", b"m", key="s", fmt="raw")
    assert len(raw) == 64 and pub.verify(b"m", raw, fmt="raw")


async def test_sm2_encrypt_formats_through_service(service: CryptoService) -> None:
    await service.create_key("s", "sm2")
    info = (await op(service, "public_key", key="s"))[0]["record"]
    for fmt in ("der", "c1c3c2", "c1c2c3"):
        _, ct = await op(service, "encrypt", b"hi", key="s", fmt=fmt)
        assert (await op(service, "decrypt", ct, key="s", fmt=fmt))[1] == b"hi"
    # ciphertext made elsewhere with the exported public key
    ct = sm.SM2PublicKey.from_bytes(bytes.fromhex(info["public_key"])).encrypt(b"outside", fmt="c1c3c2")
    assert (await op(service, "decrypt", ct, key="s", fmt="c1c3c2"))[1] == b"outside"


# ---- failure paths ------------------------------------------------------------------------------
async def test_unknown_key_and_wrong_kind(service: CryptoService) -> None:
    await service.create_key("e", "sm4")
    await service.create_key("h", "hmac-sm3")
    with pytest.raises(KeyNotFound):
        await op(service, "sign", b"x", key="missing")
    with pytest.raises(WrongKeyType):
        await op(service, "sign", b"x", key="e")
    with pytest.raises(WrongKeyType):
        await op(service, "encrypt", b"x", key="h")
    with pytest.raises(WrongKeyType):
        await op(service, "hmac", b"x", key="e")
    with pytest.raises(KeyNotFound):
        await op(service, "sign", b"x", key="e", version=9)


async def test_tampered_and_malformed_inputs(service: CryptoService) -> None:
    await service.create_key("s", "sm2")
    await service.create_key("e", "sm4")
    _, sig = await op(service, "sign", b"doc", key="s", fmt="raw")
    bad = bytearray(sig)
    bad[10] ^= 1
    assert (await op(service, "verify", b"doc", key="s", sig=bytes(bad), fmt="raw"))[0]["valid"] is False
    with pytest.raises(MalformedSignature):
        await op(service, "verify", b"doc", key="s", sig=b"junk")
    _, ct = await op(service, "encrypt", b"secret", key="e")
    t = bytearray(ct)
    t[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        await op(service, "decrypt", bytes(t), key="e")
    with pytest.raises(DecryptionFailed):
        await op(service, "decrypt", ct, key="e", aad=b"other")
    with pytest.raises(MalformedCiphertext):
        await op(service, "decrypt", b"short", key="e")
    _, sct = await op(service, "encrypt", b"secret", key="s")
    t = bytearray(sct)
    t[-3] ^= 1
    with pytest.raises(DecryptionFailed):
        await op(service, "decrypt", bytes(t), key="s")
    with pytest.raises(MalformedCiphertext):
        await op(service, "decrypt", b"\x30\x01", key="s")


async def test_limits(service: CryptoService) -> None:
    await service.create_key("s", "sm2")
    with pytest.raises(InputTooLarge):
        await op(service, "hash", b"x" * (service.settings.max_input_bytes + 1))
    with pytest.raises(InvalidCryptoInput):
        await op(service, "encrypt", b"x" * 256, key="s")
    with pytest.raises(InvalidCryptoInput):
        await op(service, "random", n=0)
    with pytest.raises(InvalidCryptoInput):
        await op(service, "random", n=100_000)
    with pytest.raises(InvalidCryptoInput):
        await op(service, "nope")
    assert len((await op(service, "random", n=32))[1]) == 32


async def test_hash_and_hmac(service: CryptoService) -> None:
    assert (await op(service, "hash", b"abc"))[1] == sm.sm3(b"abc")
    big = os.urandom(200_000)  # above the offload threshold: runs on a thread
    assert (await op(service, "hash", big))[1] == sm.sm3(big)
    rec = await service.create_key("h", "hmac-sm3")
    key = service.backend._secret(rec)  # type: ignore[attr-defined]
    assert isinstance(key, bytes)
    assert (await op(service, "hmac", b"data", key="h"))[1] == sm.hmac_sm3(key, b"data")


async def test_batch_op_runs_items_independently(service: CryptoService) -> None:
    await service.create_key("s", "sm2")
    await service.create_key("e", "sm4")
    _, good_sig = await op(service, "sign", b"doc", key="s")
    items = [
        {"op": "sign", "key": "s"},
        {"op": "verify", "key": "s", "sig": good_sig},
        {"op": "sign", "key": "missing"},
        {"op": "verify", "key": "s", "sig": b"junk"},
        {"op": "encrypt", "key": "e"},
        {"op": "hash"},
        {"op": "create_key", "key": "x", "kind": "sm2"},  # not batchable
        {"op": "sign", "key": "e"},
    ]
    payloads = [b"doc", b"doc", b"x", b"doc", b"secret", b"abc", b"", b"x"]
    m, out = await op(service, "batch", b"".join(payloads), items=items, sizes=[len(p) for p in payloads])
    res, sizes = m["results"], m["sizes"]
    parts, pos = [], 0
    for n in sizes:
        parts.append(out[pos : pos + n])
        pos += n
    assert res[0]["version"] == 1 and sm.SM2PublicKey.from_pem(
        (await op(service, "public_key", key="s"))[0]["record"]["pem"]
    ).verify(b"doc", parts[0])
    assert res[1]["valid"] is True
    assert res[2]["error"]["code"] == "key_not_found"
    assert res[3]["error"]["code"] == "malformed_signature"
    assert (await op(service, "decrypt", parts[4], key="e"))[1] == b"secret"
    assert parts[5] == sm.sm3(b"abc")
    assert res[6]["error"]["code"] == "invalid_crypto_input"
    assert res[7]["error"]["code"] == "wrong_key_type"
    with pytest.raises(KeyNotFound):
        await op(service, "public_key", key="x")  # the non-batchable item did nothing


@pytest.mark.parametrize(
    "items,sizes,payload",
    [
        ([{"op": "hash"}], [5], b"abc"),  # sizes do not add up
        ([], [], b""),  # empty
        ([{"op": "hash"}], [-1], b""),
        ("nope", [1], b"a"),
    ],
)
async def test_batch_op_rejects_malformed_batches(
    service: CryptoService, items: object, sizes: object, payload: bytes
) -> None:
    with pytest.raises(InvalidCryptoInput):
        await op(service, "batch", payload, items=items, sizes=sizes)


async def test_ops_are_counted_in_metrics(service: CryptoService) -> None:
    from prometheus_client import REGISTRY

    def count(op_: str, outcome: str) -> float:
        v = REGISTRY.get_sample_value("xc_crypto_ops_total", {"op": op_, "backend": "soft", "outcome": outcome})
        return v or 0.0

    await service.create_key("m", "sm2")
    ok0, nf0 = count("sign", "ok"), count("sign", "key_not_found")
    await op(service, "sign", b"x", key="m")
    with pytest.raises(KeyNotFound):
        await op(service, "sign", b"x", key="nope")
    assert count("sign", "ok") == ok0 + 1 and count("sign", "key_not_found") == nf0 + 1
