"""Settings of the crypto capability (the `[crypto]` table of the config file, XC_CRYPTO__* env vars).

```toml
[crypto]
backend = "soft"            # soft | pkcs11 | sdf
access = "owner"            # owner: one HSM owner process holds the keys; direct: in-process (soft only)
master_key_file = "/etc/xcstack/master.key"   # 16 bytes (raw, hex or base64), mode 0600
# or XC_CRYPTO__MASTER_KEY=<32 hex chars>

[crypto.pkcs11]
library = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "xcstack"
pin = "..."                 # or XC_CRYPTO__PKCS11__PIN
sign_mechanism = 0x80008104 # e.g. Sansec SM2 sign; SoftHSM: 0x1041 (CKM_ECDSA)
```
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


def parse_master_key(text: str) -> bytes:
    """A master key given as 32 hex chars, base64 of 16 bytes, or (files only) 16 raw bytes."""
    t = text.strip()
    try:
        if len(t) == 32:
            return bytes.fromhex(t)
    except ValueError:
        pass
    try:
        raw = base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 16:
        return raw
    raise ValueError("master key must be 16 bytes: 32 hex characters or base64")


class Pkcs11Settings(BaseModel):
    """A PKCS#11 token. Chinese HSMs expose SM2/SM3/SM4 as vendor-defined mechanisms, so every id is
    configuration. Defaults suit SoftHSM2 (ECDSA-P256 + AES-GCM) for testing."""

    model_config = ConfigDict(extra="forbid")

    library: Path | None = Field(default=None, description="the vendor's PKCS#11 .so")
    token_label: str = Field(default="xcstack", min_length=1, max_length=32)
    slot: int | None = Field(default=None, ge=0, description="slot id; default: the slot whose token has token_label")
    pin: SecretStr | None = Field(default=None, description="user PIN (XC_CRYPTO__PKCS11__PIN)")
    sessions: int = Field(
        default=4,
        ge=1,
        le=64,
        description="sessions a slow device (network HSM) works on in parallel, one device thread each; "
        "needs the library to accept CKF_OS_LOCKING_OK, else 1",
    )
    # asymmetric keys (sign/verify)
    key_type: int = Field(
        default=0x3, ge=0, le=0xFFFFFFFF, description="CKK_* for key pairs: CKK_EC=0x3, TASS CKK_SM2=0x80000004"
    )
    keygen_mechanism: int = Field(default=0x1040, ge=0, le=0xFFFFFFFF, description="CKM_EC_KEY_PAIR_GEN=0x1040")
    ec_params: str = Field(
        default="06082a8648ce3d030107",
        description="hex DER of CKA_EC_PARAMS (P-256 default; SM2: 06082a811ccf5501822d)",
    )
    sign_mechanism: int = Field(
        default=0x1041, ge=0, le=0xFFFFFFFF, description="CKM_ECDSA=0x1041; Sansec SM2 sign 0x80008104"
    )
    sign_prehash: Literal["sha256", "sm3", "sm2-z", "none"] = Field(
        default="sha256",
        description="what the host hashes before C_Sign: sm2-z = SM3(Z||M) for SM2 raw-sign mechanisms",
    )
    # symmetric keys (encrypt/decrypt)
    secret_key_type: int = Field(default=0x1F, ge=0, le=0xFFFFFFFF, description="CKK_AES=0x1F; CKK_SM4 vendor id")
    secret_keygen_mechanism: int = Field(default=0x1080, ge=0, le=0xFFFFFFFF, description="CKM_AES_KEY_GEN=0x1080")
    secret_key_bytes: int = Field(default=32, ge=16, le=64)
    encrypt_mechanism: int = Field(
        default=0x1087, ge=0, le=0xFFFFFFFF, description="CKM_AES_GCM=0x1087; SM4-GCM vendor id"
    )
    hmac_mechanism: int = Field(
        default=0x251, ge=0, le=0xFFFFFFFF, description="CKM_SHA256_HMAC=0x251; HMAC-SM3 vendor id"
    )
    hmac_key_type: int = Field(default=0x10, ge=0, le=0xFFFFFFFF, description="CKK_GENERIC_SECRET=0x10")
    hmac_keygen_mechanism: int = Field(
        default=0x350, ge=0, le=0xFFFFFFFF, description="CKM_GENERIC_SECRET_KEY_GEN=0x350"
    )

    @field_validator("ec_params")
    @classmethod
    def _hex(cls, v: str) -> str:
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError("must be hex (DER of an OID or named curve)") from None
        if not raw or raw[0] != 0x06:
            raise ValueError("must be the DER of an OBJECT IDENTIFIER (starts with 06)")
        return v.lower()

    @field_validator("library")
    @classmethod
    def _lib(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such PKCS#11 library")
        return v


class SdfSettings(BaseModel):
    """A GM/T 0018 (SDF) device through the vendor's libsdf.so."""

    model_config = ConfigDict(extra="forbid")

    library: Path | None = Field(default=None, description="the vendor's libsdf.so")
    ecc_max_bits: Literal[256, 512] = Field(
        default=512, description="ECCref_MAX_BITS the vendor compiled with (field width)"
    )
    key_password: SecretStr | None = Field(
        default=None, description="private-key access password (SDF_GetPrivateKeyAccessRight)"
    )
    kek_index: int = Field(default=1, ge=1, le=65535, description="device KEK that wraps SM4 session keys")
    max_key_index: int = Field(default=64, ge=1, le=65535)

    @field_validator("library")
    @classmethod
    def _lib(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such SDF library")
        return v


class CryptoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    backend: Literal["soft", "pkcs11", "sdf"] = "soft"
    access: Literal["owner", "direct"] = Field(
        default="owner", description="owner: http workers reach keys through the HSM owner process; direct: in-process"
    )
    socket_path: Path | None = Field(
        default=None, description="HSM owner socket; default <data_dir>/run/hsm-owner.sock"
    )
    call_timeout_s: float = Field(default=5.0, gt=0, le=120, description="per-call limit; the caller gets 503 after it")
    max_input_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20, description="largest sign/encrypt/hash input")
    master_key_file: Path | None = Field(
        default=None,
        description="soft backend key-encryption key (16 bytes; mode 0600); default <data_dir>/crypto/master.key",
    )
    master_key: SecretStr | None = Field(default=None, description="XC_CRYPTO__MASTER_KEY: 32 hex chars or base64")
    create_master_key: bool = Field(
        default=True, description="create the master key file (0600) on first use if absent"
    )
    default_uid: str = Field(default="1234567812345678", min_length=1, max_length=1024, description="SM2 user id")
    key_cache_ttl_s: float = Field(default=2.0, ge=0, le=3600, description="how long the current key version is cached")
    max_versions: int = Field(default=32, ge=1, le=1000, description="most versions kept (and tried) per key")
    pkcs11: Pkcs11Settings = Pkcs11Settings()
    sdf: SdfSettings = SdfSettings()

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_master_key(v.get_secret_value())  # raises ValueError without echoing the value
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CryptoSettings:
        if self.access == "direct" and self.backend != "soft":
            raise ValueError("access = 'direct' is only for the soft backend (a device has one owner)")
        if self.backend == "pkcs11" and self.enabled and self.pkcs11.library is None:
            raise ValueError("backend = 'pkcs11' needs [crypto.pkcs11] library")
        if self.backend == "sdf" and self.enabled and self.sdf.library is None:
            raise ValueError("backend = 'sdf' needs [crypto.sdf] library")
        return self
