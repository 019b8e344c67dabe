"""The software backend: keys sealed under the master key in the keystore, operations in-process."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from xcstack.crypto.backends.base import Backend, KeyMaterial, require_kind
from xcstack.crypto.errors import BackendError, DecryptionFailed, MalformedCiphertext
from xcstack.crypto.keystore import KeyRecord, load_master_key, seal_aad
from xcstack.crypto.primitives.sm2 import SM2PrivateKey, SM2PublicKey
from xcstack.crypto.recipes import hmac_sm3, sm4_gcm_open, sm4_gcm_seal
from xcstack.crypto.settings import CryptoSettings

_CACHE_MAX = 4096


class SoftBackend(Backend):
    name = "soft"

    def __init__(self, master_key: bytes) -> None:
        self._mk = master_key
        self._keys: OrderedDict[tuple[str, int], SM2PrivateKey | SM2PublicKey | bytes] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, settings: CryptoSettings, data_dir: Path) -> SoftBackend:
        return cls(load_master_key(settings, data_dir))

    @property
    def master_key(self) -> bytes:
        return self._mk

    def generate(self, name: str, version: int, kind: str, taken: frozenset[str] = frozenset()) -> KeyMaterial:
        aad = seal_aad(name, version, kind)
        if kind == "sm2":
            key = SM2PrivateKey.generate()
            return KeyMaterial(key.public_key.to_bytes(), sm4_gcm_seal(self._mk, key.to_bytes(), aad), None, "SM2")
        if kind == "sm4":
            return KeyMaterial(None, sm4_gcm_seal(self._mk, os.urandom(16), aad), None, "SM4-GCM")
        return KeyMaterial(None, sm4_gcm_seal(self._mk, os.urandom(32), aad), None, "HMAC-SM3")

    def _secret(self, rec: KeyRecord) -> SM2PrivateKey | bytes:
        k = (rec.name, rec.version)
        with self._lock:
            hit = self._keys.get(k)
            if hit is not None:
                self._keys.move_to_end(k)
        if hit is not None and not isinstance(hit, SM2PublicKey):
            return hit
        if rec.sealed is None:
            raise BackendError(f"key {rec.name!r} v{rec.version} has no sealed material for the soft backend")
        try:
            raw = sm4_gcm_open(self._mk, rec.sealed, seal_aad(rec.name, rec.version, rec.kind))
        except (DecryptionFailed, MalformedCiphertext):
            raise BackendError(
                f"key {rec.name!r} v{rec.version} cannot be unsealed (wrong master key or altered keystore)"
            ) from None
        obj: SM2PrivateKey | bytes
        if rec.kind == "sm2":
            pub = SM2PublicKey(rec.public_key) if rec.public_key else None
            obj = SM2PrivateKey(raw, pub)
        else:
            obj = raw
        with self._lock:
            self._keys[k] = obj
            if len(self._keys) > _CACHE_MAX:
                self._keys.popitem(last=False)
        return obj

    def derive_public_key(self, rec: KeyRecord) -> bytes | None:
        """d*G of the sealed secret, computed by the SM2 backend (for records stored without it)."""
        if rec.kind != "sm2":
            return None
        key = self._secret(rec)
        assert isinstance(key, SM2PrivateKey)
        return key.public_key.to_bytes()

    def _public(self, rec: KeyRecord) -> SM2PublicKey:
        k = (rec.name, rec.version)
        hit = self._keys.get(k)
        if isinstance(hit, SM2PrivateKey):
            return hit.public_key
        if isinstance(hit, SM2PublicKey):
            return hit
        if rec.public_key is None:
            raise BackendError(f"key {rec.name!r} v{rec.version} has no public key")
        pub = SM2PublicKey(rec.public_key)
        with self._lock:
            self._keys.setdefault(k, pub)
        return pub

    def sign(self, rec: KeyRecord, data: bytes, uid: bytes) -> bytes:
        require_kind(rec, "sm2")
        key = self._secret(rec)
        assert isinstance(key, SM2PrivateKey)
        return key.sign(data, uid, fmt="raw")

    def verify(self, rec: KeyRecord, data: bytes, raw_sig: bytes, uid: bytes) -> bool:
        require_kind(rec, "sm2")
        return self._public(rec).verify(data, raw_sig, uid, fmt="raw")

    def encrypt(self, rec: KeyRecord, plaintext: bytes, aad: bytes) -> bytes:
        require_kind(rec, "sm2", "sm4")
        if rec.kind == "sm2":
            return self._public(rec).encrypt(plaintext, fmt="der")
        key = self._secret(rec)
        assert isinstance(key, bytes)
        return sm4_gcm_seal(key, plaintext, aad)

    def decrypt(self, rec: KeyRecord, ciphertext: bytes, aad: bytes) -> bytes:
        require_kind(rec, "sm2", "sm4")
        key = self._secret(rec)
        if isinstance(key, SM2PrivateKey):
            return key.decrypt(ciphertext, fmt="der")
        return sm4_gcm_open(key, ciphertext, aad)

    def hmac(self, rec: KeyRecord, data: bytes) -> bytes:
        require_kind(rec, "hmac-sm3")
        key = self._secret(rec)
        assert isinstance(key, bytes)
        return hmac_sm3(key, data)

    def random(self, n: int) -> bytes:
        return os.urandom(n)

    def forget(self, rec: KeyRecord) -> None:
        with self._lock:
            self._keys.pop((rec.name, rec.version), None)
