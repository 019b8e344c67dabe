"""Errors of the crypto capability. They are `XCError`s, so a route can let them through and the
client gets `{"error": {type, code, message}}` with a stable code; services raise them directly.

| class | status | code |
|---|---|---|
| KeyNotFound | 404 | key_not_found |
| KeyExists | 409 | key_exists |
| WrongKeyType | 400 | wrong_key_type |
| MalformedSignature | 400 | malformed_signature |
| MalformedCiphertext | 400 | malformed_ciphertext |
| MalformedKey | 400 | malformed_key |
| DecryptionFailed | 400 | decryption_failed (tampered or wrong key: a clean failure, no detail) |
| InputTooLarge | 400 | input_too_large |
| InvalidCryptoInput | 400 | invalid_crypto_input |
| UnsupportedOperation | 400 | unsupported_operation (the backend's mechanisms cannot do it) |
| CryptoUnavailable | 503 | crypto_unavailable (retriable: the HSM owner is down or restarting) |
| CryptoTimeout | 503 | crypto_timeout (retriable) |
| BackendError | 500 | crypto_backend_error |
"""

from __future__ import annotations

from xcstack.errors import BadRequest, Conflict, NotFound, Overloaded, XCError


class CryptoError(XCError):
    """Base class; a bare CryptoError is an internal backend failure (500)."""

    status = 500
    type = "server_error"
    code = "crypto_error"


class KeyNotFound(NotFound):
    code = "key_not_found"


class KeyExists(Conflict):
    code = "key_exists"


class WrongKeyType(BadRequest):
    code = "wrong_key_type"


class MalformedSignature(BadRequest):
    code = "malformed_signature"


class MalformedCiphertext(BadRequest):
    code = "malformed_ciphertext"


class MalformedKey(BadRequest):
    code = "malformed_key"


class DecryptionFailed(BadRequest):
    code = "decryption_failed"

    def __init__(self, message: str = "decryption failed (wrong key, or the ciphertext was altered)") -> None:
        super().__init__(message)


class InputTooLarge(BadRequest):
    code = "input_too_large"


class InvalidCryptoInput(BadRequest):
    code = "invalid_crypto_input"


class UnsupportedOperation(BadRequest):
    code = "unsupported_operation"


class CryptoUnavailable(Overloaded):
    code = "crypto_unavailable"


class CryptoTimeout(Overloaded):
    code = "crypto_timeout"


class BackendError(CryptoError):
    code = "crypto_backend_error"


# code -> class, so an error that crossed the IPC boundary is re-raised as the same type
ERROR_CLASSES: dict[str, type[XCError]] = {
    c.code: c
    for c in (
        KeyNotFound,
        KeyExists,
        WrongKeyType,
        MalformedSignature,
        MalformedCiphertext,
        MalformedKey,
        DecryptionFailed,
        InputTooLarge,
        InvalidCryptoInput,
        UnsupportedOperation,
        BackendError,
    )
}


def rebuild_error(code: str, message: str) -> XCError:
    """The XCError for an error code received from the HSM owner."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return BackendError(message)
    if cls is DecryptionFailed:
        return DecryptionFailed(message)
    return cls(message)
