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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from xcstack.errors import BadRequest

MAX_VERSION = 2**31 - 1  # key versions are INTEGER columns in the keystore
KeyName = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
B64 = Field(default=None, max_length=96 << 20)


def b64decode(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64", code="invalid_base64", param=field) from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Base(BaseModel):
    # strict: JSON types are what they say (true is not the integer 1, "1" is not 1, 1 is not true)
    model_config = ConfigDict(extra="forbid", strict=True)


class _DataIn(_Base):
    data: str | None = B64
    text: str | None = Field(default=None, max_length=64 << 20)

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
    signature: str = Field(min_length=1, max_length=4096)


class EncryptRequest(_Base):
    key: str = KeyName
    plaintext: str | None = B64
    text: str | None = Field(default=None, max_length=64 << 20)
    aad: str | None = Field(default=None, max_length=1 << 16, description="base64 additional authenticated data")
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
    ciphertext: str = Field(min_length=1, max_length=96 << 20)
    aad: str | None = Field(default=None, max_length=1 << 16)
    format: Literal["der", "c1c3c2", "c1c2c3"] = "der"
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)


class HashRequest(_DataIn):
    alg: Literal["sm3"] = "sm3"


class HmacRequest(_DataIn):
    key: str = KeyName


class RandomRequest(_Base):
    n: int = Field(ge=1, le=4096)
