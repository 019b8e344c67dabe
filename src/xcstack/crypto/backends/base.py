"""The backend contract. Calls are synchronous and run in the process that owns the device
(the HSM owner, or the http worker in `direct` soft mode)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from xcstack.crypto.errors import WrongKeyType
from xcstack.crypto.keystore import KeyRecord
from xcstack.crypto.primitives.curve import N


class KeyMaterial(NamedTuple):
    public_key: bytes | None  # SM2: 64-byte x||y; EC: 65-byte 04||x||y
    sealed: bytes | None  # soft: SM4-GCM sealed secret; sdf: KEK-wrapped SM4 key
    handle: str | None  # pkcs11: object label; sdf: key index
    algorithm: str  # what the device really does ("SM2", "ECDSA-P256", "SM4-GCM", "AES-GCM", ...)


class Backend(ABC):
    name: str = "?"
    # True when the device calls release the GIL (ctypes): the owner then runs them on one device
    # thread so its event loop serves IPC in parallel. False: calls run inline (they hold the GIL).
    releases_gil: bool = False
    # device calls that may run at the same time (PKCS#11 sessions on a thread-safe library)
    parallel: int = 1

    @abstractmethod
    def generate(self, name: str, version: int, kind: str, taken: frozenset[str] = frozenset()) -> KeyMaterial:
        """Create key material; `taken`: device handles already used by other keys (SDF indexes)."""

    @abstractmethod
    def sign(self, rec: KeyRecord, data: bytes, uid: bytes) -> bytes:
        """Raw r||s signature of `data` (the backend hashes as its algorithm requires)."""

    @abstractmethod
    def verify(self, rec: KeyRecord, data: bytes, raw_sig: bytes, uid: bytes) -> bool: ...

    @abstractmethod
    def encrypt(self, rec: KeyRecord, plaintext: bytes, aad: bytes) -> bytes:
        """SM2: DER C1C3C2. Symmetric: a self-contained blob (nonce/IV || ciphertext || tag)."""

    @abstractmethod
    def decrypt(self, rec: KeyRecord, ciphertext: bytes, aad: bytes) -> bytes: ...

    @abstractmethod
    def hmac(self, rec: KeyRecord, data: bytes) -> bytes: ...

    @abstractmethod
    def random(self, n: int) -> bytes: ...

    def derive_public_key(self, rec: KeyRecord) -> bytes | None:
        """The public half of an SM2 key recorded without it, or None when this backend cannot tell
        (device keys always record theirs at generation)."""
        return None

    def curve_order(self, rec: KeyRecord) -> int:
        """Order n of the signing curve (for DER conversion and range checks)."""
        return N

    def forget(self, rec: KeyRecord) -> None:  # noqa: B027 - optional hook
        """Drop any cached handle for `rec`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def require_kind(rec: KeyRecord, *kinds: str) -> None:
    if rec.kind not in kinds:
        raise WrongKeyType(f"key {rec.name!r} is a {rec.kind} key; this operation needs {' or '.join(kinds)}")
