"""SM2 backends behind `xcstack.crypto.primitives.sm2` and how one is chosen at import.

Why several: no single SM2 library installs everywhere xcstack runs. `openssl` (the system libcrypto
3.x through ctypes, `sm2_openssl.py`) needs nothing installed and uses constant-time scalar
multiplication; `gmssl-pyx` (bundled GmSSL) has x86_64 wheels only; `gmalglib` builds from its sdist
with a C compiler alone (x86_64, aarch64, loongarch64). Measurements and the reasons for the order
are in docs/crypto.md ("SM2 backends").

`XC_SM2_BACKEND` = `auto` (default: the first of AUTO_ORDER that loads) or a backend name (that one,
or no SM2 at all: a configured choice never silently falls back). Every backend works on raw values:
`sm2.py` computes e = SM3(Z||M), validates and converts encodings; a backend declares the signature
and ciphertext encodings it speaks natively (`native_sig`, `native_ct`) so `sm2.py` converts only when
needed. A handle (`load_private` / `load_public`) is built once per key and reused.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Literal, Protocol

from xcstack.crypto.errors import CryptoUnavailable, DecryptionFailed

AUTO_ORDER: tuple[str, ...] = ("openssl", "gmssl-pyx", "gmalglib")


class SM2Backend(Protocol):
    name: str
    version: str
    library: str
    native_sig: Literal["der", "raw"]
    native_ct: Literal["der", "c1c3c2"]
    constant_time: bool

    def generate(self) -> tuple[bytes, bytes]:
        """(d 32 bytes, x||y 64 bytes)."""

    def public_from_private(self, d32: bytes) -> bytes:
        """x||y of d*G: for a private key imported without its public half (computed once, then stored)."""

    def load_private(self, d32: bytes, pub64: bytes) -> Any: ...

    def load_public(self, pub64: bytes) -> Any: ...

    def sign_digest(self, key: Any, e: bytes) -> bytes:
        """Signature of e in `native_sig` encoding."""

    def verify_digest(self, key: Any, e: bytes, sig: bytes) -> bool:
        """`sig` is canonical, in `native_sig` encoding; False for a signature that does not verify."""

    def encrypt(self, key: Any, plaintext: bytes) -> bytes:
        """Ciphertext in `native_ct` encoding (C1C3C2, C3 = SM3)."""

    def decrypt(self, key: Any, ciphertext: bytes) -> bytes:
        """`ciphertext` is canonical `native_ct`; DecryptionFailed when C3 (or C1) is wrong."""


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class GmsslPyxBackend:
    """gmssl-pyx 2.x (GmSSL 3.1 inside; x86_64 wheels). Holds the GIL while it computes."""

    name = "gmssl-pyx"
    native_sig: Literal["der", "raw"] = "der"
    native_ct: Literal["der", "c1c3c2"] = "der"
    constant_time = False  # GmSSL sm2_z256: table index and branches follow the secret's Booth digits

    def __init__(self) -> None:
        import gmssl_pyx

        self._g = gmssl_pyx
        self.version = _dist_version("gmssl-pyx")
        self.library = getattr(gmssl_pyx, "__file__", "") or "gmssl_pyx"

    def generate(self) -> tuple[bytes, bytes]:
        pub, priv = self._g.sm2_key_generate()
        return bytes(priv), bytes(pub)

    def public_from_private(self, d32: bytes) -> bytes:
        """gmssl-pyx exposes no d*G: the first other backend that loads computes it (once per imported key)."""
        for name in AUTO_ORDER:
            if name == self.name:
                continue
            try:
                other = load_backend(name)
            except (ImportError, OSError, ValueError):
                continue
            return other.public_from_private(d32)
        raise CryptoUnavailable("gmssl-pyx cannot derive an SM2 public key and no other SM2 backend loads")

    def load_private(self, d32: bytes, pub64: bytes) -> bytes:
        return d32

    def load_public(self, pub64: bytes) -> bytes:
        return pub64

    def sign_digest(self, key: bytes, e: bytes) -> bytes:
        return bytes(self._g.sm2_sign_sm3_digest(key, e))

    def verify_digest(self, key: bytes, e: bytes, sig: bytes) -> bool:
        try:
            return bool(self._g.sm2_verify_sm3_digest(key, e, sig))
        except self._g.GmsslInnerError:
            return False

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        return bytes(self._g.sm2_encrypt(key, plaintext))

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        try:
            return bytes(self._g.sm2_decrypt(key, ciphertext))
        except self._g.GmsslInnerError:
            raise DecryptionFailed() from None


class GmalglibBackend:
    """gmalglib (MIT, self-contained C; builds from its sdist with gcc alone). Nonces come from
    `os.urandom` (getrandom(2)) through its rnd_fn hook rather than its own open("/dev/urandom") per
    call, which fails in a chroot without /dev. Not constant-time (see docs/crypto.md)."""

    name = "gmalglib"
    native_sig: Literal["der", "raw"] = "raw"
    native_ct: Literal["der", "c1c3c2"] = "c1c3c2"
    constant_time = False  # fixed-base: byte-indexed table + skip of zero bytes; variable-base: sliding window

    def __init__(self) -> None:
        import gmalglib.sm2

        self._SM2 = gmalglib.sm2.SM2
        self.version = _dist_version("gmalglib")
        self.library = getattr(gmalglib.sm2, "__file__", "") or "gmalglib"

    def generate(self) -> tuple[bytes, bytes]:
        sk, pk = self._SM2(rnd_fn=os.urandom).generate_keypair()
        return bytes(sk), bytes(pk)[1:]

    def public_from_private(self, d32: bytes) -> bytes:
        return bytes(self._SM2.get_pk(d32))[1:]

    def load_private(self, d32: bytes, pub64: bytes) -> Any:
        return self._SM2(sk=d32, rnd_fn=os.urandom)

    def load_public(self, pub64: bytes) -> Any:
        return self._SM2(pk=b"\x04" + pub64, rnd_fn=os.urandom)

    def sign_digest(self, key: Any, e: bytes) -> bytes:
        while True:
            sig = bytes(key.sign_digest(e))
            # its retry loop is `do { ... continue; } while (0)`: r == 0 or s == 0 would come back (~2^-256)
            if int.from_bytes(sig[:32], "big") and int.from_bytes(sig[32:], "big"):
                return sig

    def verify_digest(self, key: Any, e: bytes, sig: bytes) -> bool:
        return bool(key.verify_digest(e, sig))

    def encrypt(self, key: Any, plaintext: bytes) -> bytes:
        return bytes(key.encrypt(plaintext))

    def decrypt(self, key: Any, ciphertext: bytes) -> bytes:
        try:
            return bytes(key.decrypt(ciphertext))
        except (ValueError, RuntimeError):
            raise DecryptionFailed() from None


def _openssl() -> SM2Backend:
    from xcstack.crypto.primitives.sm2_openssl import OpenSSLBackend

    return OpenSSLBackend()


_FACTORIES: dict[str, Any] = {"openssl": _openssl, "gmssl-pyx": GmsslPyxBackend, "gmalglib": GmalglibBackend}
BACKEND_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def load_backend(name: str) -> SM2Backend:
    """One backend by name; ImportError/OSError (or ValueError for an unknown name) when it cannot load."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown SM2 backend {name!r} (choose auto or one of {', '.join(BACKEND_NAMES)})")
    backend: SM2Backend = factory()
    return backend


def select_backend(wanted: str) -> tuple[SM2Backend | None, dict[str, str]]:
    """The backend for `wanted` (auto or a name) and why each one tried before it did not load."""
    names = AUTO_ORDER if wanted == "auto" else (wanted,)
    errors: dict[str, str] = {}
    for name in names:
        try:
            return load_backend(name), errors
        except (ImportError, OSError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return None, errors
