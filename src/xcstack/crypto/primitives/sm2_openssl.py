"""SM2 through the system OpenSSL (libcrypto 3.x) C API, by ctypes: the portable SM2 backend.

Why this exists: every target distribution (Debian 12 x86_64/arm64, Kylin, UOS, openEuler with
OpenSSL 3, the container image) already has a libcrypto with SM2, so nothing has to be built or
downloaded for SM2 on an air-gapped host. OpenSSL computes secret scalar multiples (the signing
nonce k*G, the decryption d*C1) with its Montgomery ladder (`ossl_ec_scalar_mul_ladder`), checks C3
with CRYPTO_memcmp and draws nonces from its DRBG. ctypes releases the GIL during each call.

Everything here works on raw values: e = SM3(Z||M) is computed by `sm2.py` (with its cached Z), so
OpenSSL signs and verifies the 32-byte digest (EVP_PKEY_sign/verify on an SM2 key). Signatures and
ciphertexts are DER (GM/T 0009), as OpenSSL writes them. An EVP_PKEY is built once per key and shared
between threads (read-only use is thread-safe); each thread initialises its own EVP_PKEY_CTX per
operation once and reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any, Literal

from xcstack.crypto.errors import BackendError, DecryptionFailed

_VP = ctypes.c_void_p
_SZ = ctypes.c_size_t
_INT = ctypes.c_int
_CP = ctypes.c_char_p

# OSSL_KEYMGMT_SELECT_*: EVP_PKEY_PUBLIC_KEY = all parameters | public, EVP_PKEY_KEYPAIR = | private
_SELECT_PUBLIC = 0x86
_SELECT_KEYPAIR = 0x87

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "OpenSSL_version_num": (ctypes.c_ulong, []),
    "OpenSSL_version": (_CP, [_INT]),
    "ERR_clear_error": (None, []),
    "EVP_PKEY_CTX_new_from_name": (_VP, [_VP, _CP, _CP]),
    "EVP_PKEY_CTX_new": (_VP, [_VP, _VP]),
    "EVP_PKEY_CTX_free": (None, [_VP]),
    "EVP_PKEY_free": (None, [_VP]),
    "EVP_PKEY_is_a": (_INT, [_VP, _CP]),
    "EVP_PKEY_keygen_init": (_INT, [_VP]),
    "EVP_PKEY_generate": (_INT, [_VP, ctypes.POINTER(_VP)]),
    "EVP_PKEY_fromdata_init": (_INT, [_VP]),
    "EVP_PKEY_fromdata": (_INT, [_VP, ctypes.POINTER(_VP), _INT, _VP]),
    "EVP_PKEY_get_bn_param": (_INT, [_VP, _CP, ctypes.POINTER(_VP)]),
    "EVP_PKEY_get_octet_string_param": (_INT, [_VP, _CP, _CP, _SZ, ctypes.POINTER(_SZ)]),
    "EVP_PKEY_sign_init": (_INT, [_VP]),
    "EVP_PKEY_sign": (_INT, [_VP, _CP, ctypes.POINTER(_SZ), _CP, _SZ]),
    "EVP_PKEY_verify_init": (_INT, [_VP]),
    "EVP_PKEY_verify": (_INT, [_VP, _CP, _SZ, _CP, _SZ]),
    "EVP_PKEY_encrypt_init": (_INT, [_VP]),
    "EVP_PKEY_encrypt": (_INT, [_VP, _CP, ctypes.POINTER(_SZ), _CP, _SZ]),
    "EVP_PKEY_decrypt_init": (_INT, [_VP]),
    "EVP_PKEY_decrypt": (_INT, [_VP, _CP, ctypes.POINTER(_SZ), _CP, _SZ]),
    "BN_bin2bn": (_VP, [_CP, _INT, _VP]),
    "BN_bn2binpad": (_INT, [_VP, _CP, _INT]),
    "BN_clear_free": (None, [_VP]),
    "OSSL_PARAM_BLD_new": (_VP, []),
    "OSSL_PARAM_BLD_free": (None, [_VP]),
    "OSSL_PARAM_BLD_push_utf8_string": (_INT, [_VP, _CP, _CP, _SZ]),
    "OSSL_PARAM_BLD_push_octet_string": (_INT, [_VP, _CP, _CP, _SZ]),
    "OSSL_PARAM_BLD_push_BN": (_INT, [_VP, _CP, _VP]),
    "OSSL_PARAM_BLD_to_param": (_VP, [_VP]),
    "OSSL_PARAM_free": (None, [_VP]),
    # d*G for a private key imported without its public half (EC_POINT_mul: the call OpenSSL's own
    # key generation makes; with a generator scalar only, it runs the constant-time ladder)
    "OBJ_sn2nid": (_INT, [_CP]),
    "EC_GROUP_new_by_curve_name": (_VP, [_INT]),
    "EC_GROUP_free": (None, [_VP]),
    "EC_POINT_new": (_VP, [_VP]),
    "EC_POINT_free": (None, [_VP]),
    "EC_POINT_mul": (_INT, [_VP, _VP, _VP, _VP, _VP, _VP]),
    "EC_POINT_point2oct": (_SZ, [_VP, _VP, _INT, _CP, _SZ, _VP]),
    "BN_CTX_new": (_VP, []),
    "BN_CTX_free": (None, [_VP]),
}

_POINT_UNCOMPRESSED = 4  # POINT_CONVERSION_UNCOMPRESSED


class OpenSSLUnavailable(ImportError):
    """No usable libcrypto (missing, older than 3.0, or built without SM2)."""


def _candidates() -> list[str]:
    explicit = os.environ.get("XC_SM2_OPENSSL_LIB")
    if explicit:
        return [explicit]
    names = ["libcrypto.so.3"]
    found = ctypes.util.find_library("crypto")
    if found and found not in names:
        names.append(found)
    return names


def _load() -> tuple[ctypes.CDLL, str]:
    errors: list[str] = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        try:
            for fn, (res, args) in _SIGNATURES.items():
                f = getattr(lib, fn)
                f.restype = res
                f.argtypes = args
        except AttributeError as exc:  # OpenSSL 1.1 has no OSSL_PARAM_BLD / EVP_PKEY_fromdata
            errors.append(f"{name}: not OpenSSL >= 3.0 ({exc})")
            continue
        if lib.OpenSSL_version_num() < 0x30000000:
            errors.append(f"{name}: OpenSSL older than 3.0")
            continue
        return lib, name
    raise OpenSSLUnavailable("; ".join(errors) or "no libcrypto found")


class _PKey:
    """Owns one EVP_PKEY* and, per thread and operation, one initialised EVP_PKEY_CTX (OpenSSL allows
    EVP_PKEY_sign/verify/encrypt/decrypt to be called again on the same context; re-creating and
    re-initialising it per call costs a provider fetch, ~4% of a signature). All freed with the key."""

    __slots__ = ("__weakref__", "_ctxs", "_lib", "_local", "_lock", "ptr")

    def __init__(self, lib: ctypes.CDLL, ptr: int) -> None:
        self._lib = lib
        self.ptr = ptr
        self._local = threading.local()
        self._lock = threading.Lock()
        self._ctxs: list[int] = []

    def ctx(self, op: str) -> int:
        """This thread's EVP_PKEY_CTX for `op` (sign, verify, encrypt, decrypt), initialised once."""
        c: int | None = getattr(self._local, op, None)
        if c is None:
            lib = self._lib
            c = lib.EVP_PKEY_CTX_new(self.ptr, None)
            if not c:
                raise BackendError(f"SM2 {op}: EVP_PKEY_CTX_new failed")
            if getattr(lib, f"EVP_PKEY_{op}_init")(c) != 1:
                lib.EVP_PKEY_CTX_free(c)
                lib.ERR_clear_error()
                raise BackendError(f"SM2 {op}: EVP_PKEY_{op}_init failed")
            with self._lock:
                self._ctxs.append(c)
            setattr(self._local, op, c)
        return c

    def __del__(self) -> None:
        ptr, self.ptr = self.ptr, 0
        for c in self._ctxs:
            self._lib.EVP_PKEY_CTX_free(c)
        self._ctxs = []
        if ptr:
            self._lib.EVP_PKEY_free(ptr)


class OpenSSLBackend:
    """SM2 with libcrypto's EVP_PKEY API (see the module docstring)."""

    name = "openssl"
    native_sig: Literal["der", "raw"] = "der"
    native_ct: Literal["der", "c1c3c2"] = "der"
    constant_time = True

    def __init__(self) -> None:
        self._lib, self.library = _load()
        raw = self._lib.OpenSSL_version(0)
        self.version = raw.decode() if raw else hex(self._lib.OpenSSL_version_num())
        # built without SM2 (e.g. `no-sm2`) or with a provider that lacks it: fail here, not at first use
        ctx = self._lib.EVP_PKEY_CTX_new_from_name(None, b"SM2", None)
        if not ctx:
            self._lib.ERR_clear_error()
            raise OpenSSLUnavailable(f"{self.library} ({self.version}) has no SM2 key type")
        self._lib.EVP_PKEY_CTX_free(ctx)

    # -- keys -------------------------------------------------------------------------------------
    def generate(self) -> tuple[bytes, bytes]:
        """A new key pair from OpenSSL's DRBG: (d 32 bytes, x||y 64 bytes)."""
        lib = self._lib
        ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"SM2", None)
        pkey = _VP()
        bn = _VP()
        try:
            if not ctx or lib.EVP_PKEY_keygen_init(ctx) != 1 or lib.EVP_PKEY_generate(ctx, ctypes.byref(pkey)) != 1:
                raise self._fail("SM2 key generation")
            d = ctypes.create_string_buffer(32)
            pub = ctypes.create_string_buffer(65)
            n = _SZ()
            if (
                lib.EVP_PKEY_get_bn_param(pkey, b"priv", ctypes.byref(bn)) != 1
                or lib.BN_bn2binpad(bn, d, 32) != 32
                or lib.EVP_PKEY_get_octet_string_param(pkey, b"pub", pub, 65, ctypes.byref(n)) != 1
                or n.value != 65
            ):
                raise self._fail("SM2 key export")
            out = (d.raw, pub.raw[1:])
            ctypes.memset(d, 0, 32)
            return out
        finally:
            lib.BN_clear_free(bn)
            lib.EVP_PKEY_free(pkey)
            lib.EVP_PKEY_CTX_free(ctx)

    def public_from_private(self, d32: bytes) -> bytes:
        """x||y of d*G by EC_POINT_mul on the SM2 group (OpenSSL 3.0's EVP import does not derive it)."""
        lib = self._lib
        group = lib.EC_GROUP_new_by_curve_name(lib.OBJ_sn2nid(b"SM2"))
        point = lib.EC_POINT_new(group) if group else None
        bn = lib.BN_bin2bn(d32, 32, None)
        bctx = lib.BN_CTX_new()
        out = ctypes.create_string_buffer(65)
        try:
            if (
                not (group and point and bn and bctx)
                or lib.EC_POINT_mul(group, point, bn, None, None, bctx) != 1
                or lib.EC_POINT_point2oct(group, point, _POINT_UNCOMPRESSED, out, 65, bctx) != 65
            ):
                raise self._fail("SM2 public key derivation")
            return out.raw[1:]
        finally:
            lib.BN_CTX_free(bctx)
            lib.BN_clear_free(bn)
            lib.EC_POINT_free(point)
            lib.EC_GROUP_free(group)

    def load_public(self, pub64: bytes) -> _PKey:
        return self._fromdata(None, pub64)

    def load_private(self, d32: bytes, pub64: bytes) -> _PKey:
        return self._fromdata(d32, pub64)

    def _fromdata(self, d32: bytes | None, pub64: bytes) -> _PKey:
        lib = self._lib
        bld = lib.OSSL_PARAM_BLD_new()
        bn = lib.BN_bin2bn(d32, 32, None) if d32 is not None else None
        params = None
        ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"SM2", None)
        pkey = _VP()
        try:
            pub = b"\x04" + pub64
            ok = (
                bld
                and ctx
                and lib.OSSL_PARAM_BLD_push_utf8_string(bld, b"group", b"SM2", 0) == 1
                and lib.OSSL_PARAM_BLD_push_octet_string(bld, b"pub", pub, len(pub)) == 1
                and (d32 is None or (bn and lib.OSSL_PARAM_BLD_push_BN(bld, b"priv", bn) == 1))
            )
            if ok:
                params = lib.OSSL_PARAM_BLD_to_param(bld)
            selection = _SELECT_PUBLIC if d32 is None else _SELECT_KEYPAIR
            if (
                not params
                or lib.EVP_PKEY_fromdata_init(ctx) != 1
                or lib.EVP_PKEY_fromdata(ctx, ctypes.byref(pkey), selection, params) != 1
            ):
                raise self._fail("SM2 key import")
            handle = _PKey(lib, pkey.value or 0)
            pkey.value = None
            return handle
        finally:
            lib.OSSL_PARAM_free(params)  # clears the private BN copy inside
            lib.OSSL_PARAM_BLD_free(bld)
            lib.BN_clear_free(bn)
            lib.EVP_PKEY_free(pkey)
            lib.EVP_PKEY_CTX_free(ctx)

    # -- operations -------------------------------------------------------------------------------
    def sign_digest(self, key: _PKey, e: bytes) -> bytes:
        """DER signature of the 32-byte digest e."""
        sig = ctypes.create_string_buffer(80)
        n = _SZ(80)
        if self._lib.EVP_PKEY_sign(key.ctx("sign"), sig, ctypes.byref(n), e, 32) != 1:
            raise self._fail("SM2 sign")
        return ctypes.string_at(sig, n.value)

    def verify_digest(self, key: _PKey, e: bytes, der: bytes) -> bool:
        ok: bool = self._lib.EVP_PKEY_verify(key.ctx("verify"), der, len(der), e, len(e)) == 1
        if not ok:
            self._lib.ERR_clear_error()  # a bad signature leaves an entry in this thread's error queue
        return ok

    def encrypt(self, key: _PKey, plaintext: bytes) -> bytes:
        """GM/T 0009 DER C1C3C2 (C3 = SM3, OpenSSL's default digest for SM2 encryption)."""
        size = len(plaintext) + 128  # 2 INTEGERs (<= 35 each) + C3 (34) + C2 (<= len + 4) + header
        out = ctypes.create_string_buffer(size)
        n = _SZ(size)
        if self._lib.EVP_PKEY_encrypt(key.ctx("encrypt"), out, ctypes.byref(n), plaintext, len(plaintext)) != 1:
            raise self._fail("SM2 encrypt")
        return ctypes.string_at(out, n.value)

    def decrypt(self, key: _PKey, der: bytes) -> bytes:
        """Plaintext of a canonical DER ciphertext; DecryptionFailed when C3 does not match."""
        size = len(der)
        out = ctypes.create_string_buffer(size)
        n = _SZ(size)
        if self._lib.EVP_PKEY_decrypt(key.ctx("decrypt"), out, ctypes.byref(n), der, size) != 1:
            self._lib.ERR_clear_error()
            raise DecryptionFailed()
        pt = out.raw[: n.value]
        ctypes.memset(out, 0, size)
        return pt

    def _fail(self, what: str) -> Exception:
        self._lib.ERR_clear_error()
        return BackendError(f"{what} failed in {self.library}")
