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

from xcstack.crypto.protocol import CryptoCode
from xcstack.errors import BadRequest, Conflict, NotFound, Overloaded, XCError


class CryptoError(XCError):
    """Base class; a bare CryptoError is an internal backend failure (500)."""

    status = 500
    type = "server_error"
    code = CryptoCode.CRYPTO_ERROR


class KeyNotFound(NotFound):
    code = CryptoCode.KEY_NOT_FOUND


class KeyExists(Conflict):
    code = CryptoCode.KEY_EXISTS


class WrongKeyType(BadRequest):
    code = CryptoCode.WRONG_KEY_TYPE


class MalformedSignature(BadRequest):
    code = CryptoCode.MALFORMED_SIGNATURE


class MalformedCiphertext(BadRequest):
    code = CryptoCode.MALFORMED_CIPHERTEXT


class MalformedKey(BadRequest):
    code = CryptoCode.MALFORMED_KEY


class DecryptionFailed(BadRequest):
    code = CryptoCode.DECRYPTION_FAILED

    def __init__(self, message: str = "decryption failed (wrong key, or the ciphertext was altered)") -> None:
        super().__init__(message)


class InputTooLarge(BadRequest):
    code = CryptoCode.INPUT_TOO_LARGE


class InvalidCryptoInput(BadRequest):
    code = CryptoCode.INVALID_CRYPTO_INPUT


class UnsupportedOperation(BadRequest):
    code = CryptoCode.UNSUPPORTED_OPERATION


class CryptoUnavailable(Overloaded):
    code = CryptoCode.CRYPTO_UNAVAILABLE


class CryptoTimeout(Overloaded):
    code = CryptoCode.CRYPTO_TIMEOUT


class BackendError(CryptoError):
    code = CryptoCode.CRYPTO_BACKEND_ERROR


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
