"""TOTP second factor (RFC 6238 via pyotp): 30 s steps, ±1 step window, replay rejected by storing
the last accepted step; otpauth URIs with a terminal QR code; hashed one-time recovery codes."""

from __future__ import annotations

import hmac
import io
import re
import secrets

import pyotp

from xcstack.crypto.recipes import sm3

STEP_S = 30
WINDOW = 1
_CODE = re.compile(r"[0-9]{6}")
_RECOVERY = re.compile(r"[0-9a-f]{6}-[0-9a-f]{6}-[0-9a-f]{6}")


def new_secret() -> str:
    return pyotp.random_base32(32)  # 160 bits


def provisioning_uri(secret: str, username: str, issuer: str) -> str:
    return pyotp.TOTP(secret, interval=STEP_S).provisioning_uri(name=username, issuer_name=issuer)


def terminal_qr(uri: str) -> str:
    """The QR code of `uri` drawn with text characters, for a terminal."""
    import qrcode

    qr = qrcode.QRCode(border=1)
    qr.add_data(uri)
    qr.make(fit=True)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue()


def verify(secret: str, code: str, now: float, last_step: int) -> int | None:
    """The accepted time step when `code` is valid at `now` (±1 step) and newer than `last_step`
    (a code is accepted at most once), else None."""
    code = normalize(code)
    if not is_code(code):
        return None
    totp = pyotp.TOTP(secret, interval=STEP_S)
    step = int(now // STEP_S)
    accepted: int | None = None
    for s in range(step - WINDOW, step + WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(s), code) and s > last_step:
            accepted = s  # no early exit: the same work for every code
    return accepted


def normalize(code: str) -> str:
    """A code as typed, blanks around and inside dropped ("123 456")."""
    return code.strip().replace(" ", "")


def is_code(code: str) -> bool:
    """Six ASCII digits. Not `str.isdigit()`: that also accepts Arabic-Indic, full-width and superscript
    digits, which `hmac.compare_digest` then refuses with TypeError (a 500 instead of a counted failure)."""
    return _CODE.fullmatch(code) is not None


def is_recovery_code(code: str) -> bool:
    """The shape `new_recovery_codes` hands out (case and surrounding blanks ignored), ASCII only."""
    return _RECOVERY.fullmatch(code.strip().lower()) is not None


def new_recovery_codes(n: int) -> list[str]:
    return ["-".join(secrets.token_hex(3) for _ in range(3)) for _ in range(n)]  # 72 bits each


def hash_recovery_code(code: str, salt: str) -> str:
    return sm3((salt + ":" + code.strip().lower()).encode()).hex()
