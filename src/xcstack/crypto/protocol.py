"""Wire schemas of `POST /v1/crypto/*` (JSON; binary values are base64, digests/MACs hex).

Inputs can be given as base64 (`data`, `plaintext`) or as UTF-8 text (`text`), exactly one.
Errors: unknown key 404 `key_not_found`; wrong key kind 400 `wrong_key_type`; bad base64 400
`invalid_base64`; malformed signature/ciphertext 400 `malformed_signature`/`malformed_ciphertext`;
tampered ciphertext 400 `decryption_failed`; input over `[crypto] max_input_bytes` 400
`input_too_large`; HSM owner down 503 `crypto_unavailable` (Retry-After).
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from xcstack.errors import BadRequest


class CryptoCode(StrEnum):
    """Stable error codes of the crypto capability (docs/crypto.md, Errors)."""

    CRYPTO_ERROR = "crypto_error"
    KEY_NOT_FOUND = "key_not_found"
    KEY_EXISTS = "key_exists"
    WRONG_KEY_TYPE = "wrong_key_type"
    MALFORMED_SIGNATURE = "malformed_signature"
    MALFORMED_CIPHERTEXT = "malformed_ciphertext"
    MALFORMED_KEY = "malformed_key"
    DECRYPTION_FAILED = "decryption_failed"
    INPUT_TOO_LARGE = "input_too_large"
    INVALID_CRYPTO_INPUT = "invalid_crypto_input"
    INVALID_BASE64 = "invalid_base64"
    UNSUPPORTED_OPERATION = "unsupported_operation"
    CRYPTO_UNAVAILABLE = "crypto_unavailable"
    CRYPTO_TIMEOUT = "crypto_timeout"
    CRYPTO_BACKEND_ERROR = "crypto_backend_error"
    MASTER_KEY_ERROR = "master_key_error"


MAX_VERSION = 2**31 - 1  # key versions are INTEGER columns in the keystore
KeyName = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# canonical base64 (RFC 4648, padded), what `b64decode` accepts: the contract's pattern for base64 fields
B64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
B64_SCHEMA: JsonDict = {"pattern": B64_PATTERN, "contentEncoding": "base64"}


def b64decode(value: str, field: str) -> bytes:
    """Strict base64. The length check refuses what `validate=True` still lets through (excess padding
    after a full quantum, `AAAA=`), so the endpoint accepts exactly the documented `B64_PATTERN`."""
    try:
        out = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        out = None
    if out is None or len(value) != -(-len(out) // 3) * 4:
        raise BadRequest(f"{field}: not valid base64", code=CryptoCode.INVALID_BASE64, param=field)
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def exactly_one(first: str, second: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of two fields is a string" (the other absent or null), what the
    `_one` validators accept, so the contract refuses both and neither as the endpoint does. Said with
    `not` rather than `oneOf`: client generators turn an object-level `oneOf` into anonymous variants
    (openapi-python-client: `HashRequestType0`/`Type1`, no `HashRequest`), and ignore `not`."""
    both = {"required": [first, second], "properties": {first: {"type": "string"}, second: {"type": "string"}}}
    neither = {"properties": {first: {"type": "null"}, second: {"type": "null"}}}
    return {"not": {"anyOf": [both, neither]}}


class _Base(BaseModel):
    # strict: JSON types are what they say (true is not the integer 1, "1" is not 1, 1 is not true)
    model_config = ConfigDict(extra="forbid", strict=True)


class _DataIn(_Base):
    model_config = ConfigDict(json_schema_extra=exactly_one("data", "text"))

    data: str | None = Field(default=None, max_length=96 << 20, description="the input, base64",
                             json_schema_extra=B64_SCHEMA)
    text: str | None = Field(default=None, max_length=64 << 20, description="the input as UTF-8 text")

    @model_validator(mode="after")
    def _one(self) -> _DataIn:
        if (self.data is None) == (self.text is None):
            raise ValueError("give exactly one of data (base64) or text (UTF-8)")
        return self

    def payload(self) -> bytes:
        if self.text is not None:
            return self.text.encode("utf-8")
        assert self.data is not None
        return b64decode(self.data, "data")


class SignRequest(_DataIn):
    key: str = KeyName
    uid: str | None = Field(default=None, min_length=1, max_length=1024, description="SM2 user id (UTF-8)")
    format: Literal["der", "raw"] = "der"
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)


class VerifyRequest(SignRequest):
    signature: str = Field(min_length=1, max_length=4096, description="base64", json_schema_extra=B64_SCHEMA)


class EncryptRequest(_Base):
    model_config = ConfigDict(json_schema_extra=exactly_one("plaintext", "text"))

    key: str = KeyName
    plaintext: str | None = Field(default=None, max_length=96 << 20, description="the plaintext, base64",
                                  json_schema_extra=B64_SCHEMA)
    text: str | None = Field(default=None, max_length=64 << 20, description="the plaintext as UTF-8 text")
    aad: str | None = Field(default=None, max_length=1 << 16, description="base64 additional authenticated data",
                            json_schema_extra=B64_SCHEMA)
    format: Literal["der", "c1c3c2", "c1c2c3"] = "der"

    @model_validator(mode="after")
    def _one(self) -> EncryptRequest:
        if (self.plaintext is None) == (self.text is None):
            raise ValueError("give exactly one of plaintext (base64) or text (UTF-8)")
        return self

    def payload(self) -> bytes:
        if self.text is not None:
            return self.text.encode("utf-8")
        assert self.plaintext is not None
        return b64decode(self.plaintext, "plaintext")


class DecryptRequest(_Base):
    key: str = KeyName
    ciphertext: str = Field(min_length=1, max_length=96 << 20, description="base64", json_schema_extra=B64_SCHEMA)
    aad: str | None = Field(default=None, max_length=1 << 16, description="base64 additional authenticated data",
                            json_schema_extra=B64_SCHEMA)
    format: Literal["der", "c1c3c2", "c1c2c3"] = "der"
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)


class HashRequest(_DataIn):
    alg: Literal["sm3"] = "sm3"


class HmacRequest(_DataIn):
    key: str = KeyName


class RandomRequest(_Base):
    n: int = Field(ge=1, le=4096)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # a query parameter that is absent, never null


class KeyInfoQuery(BaseModel):
    """The query of `GET /v1/crypto/keys/{name}` (documentation: `routes.query_version` checks it by
    hand, ASCII digits only, so that '²' or '+1' is a 400 and never a 500)."""

    version: Annotated[int, Field(ge=1, le=MAX_VERSION)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default,
        description="a key version (decimal digits); without it, the newest active version")


# -- answers (documentation of what the endpoints return; they answer plain dicts) ------------------
Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]
Base64 = Annotated[str, Field(description="base64", pattern=B64_PATTERN)]
Hex = Annotated[str, Field(description="hex", pattern=r"^(?:[0-9a-f]{2})*$")]


class SignResponse(BaseModel):
    key: str
    version: Version = Field(description="the key version that signed (the newest, or the one asked for)")
    algorithm: str = Field(description="SM2 (or the token's algorithm, e.g. ECDSA-P256 on a PKCS#11 test token)")
    format: Literal["der", "raw"]
    signature: Base64


class VerifyResponse(BaseModel):
    key: str
    valid: bool
    version: Version | None = Field(description="the version whose signature matched; null when none did")


class EncryptResponse(BaseModel):
    key: str
    version: Version
    algorithm: str
    format: Literal["der", "c1c3c2", "c1c2c3"] = Field(description="the SM2 ciphertext encoding (asked for)")
    ciphertext: Base64


class DecryptResponse(BaseModel):
    key: str
    version: Version = Field(description="the version that decrypted")
    plaintext: Base64


class HashResponse(BaseModel):
    alg: Literal["sm3"]
    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex")


class HmacResponse(BaseModel):
    key: str
    version: Version
    algorithm: str
    mac: Hex


class RandomResponse(BaseModel):
    n: int = Field(ge=1, le=4096)
    random: Base64 = Field(description="n random bytes from the key owner's device, base64")


KeyKind = Literal["sm2", "sm4", "hmac-sm3"]


class KeySummary(BaseModel):
    name: str
    kind: KeyKind
    backend: str = Field(description="soft, pkcs11 or sdf")
    algorithm: str
    version: Version = Field(description="the newest active version")
    versions: int = Field(ge=1, description="how many active versions")
    created_at: float = Field(description="when the first active version was made (Unix seconds)")


class KeyList(BaseModel):
    keys: list[KeySummary]


class KeyInfo(BaseModel):
    """A key's public information. SM2: that version's record, `public_key` (hex) and `pem`;
    a symmetric key has no public part: its summary (as in the list) with both null."""

    name: str
    kind: KeyKind
    backend: str
    algorithm: str
    version: Version
    created_at: float = Field(description="Unix seconds")
    public_key: Hex | None
    pem: str | None = Field(description="SubjectPublicKeyInfo PEM (SM2); null for symmetric keys")
    state: str | None = Field(default=None, description="active (SM2 keys)")
    versions: int | None = Field(default=None, ge=1, description="how many active versions (symmetric keys)")
