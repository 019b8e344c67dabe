"""Password storage and policy.

Storage: PBKDF2-HMAC-SM3 (default; ≥ 100,000 iterations, 16-byte random salt, 32-byte output),
encoded `pbkdf2-sm3$<iterations>$<salt b64>$<hash b64>`, or argon2id (`$argon2id$...`, argon2-cffi).
Verification is constant-time and always does the full work, also for unknown users (a dummy
hash), so timing does not reveal whether a user exists.
"""

from __future__ import annotations

import base64
import hmac
import os
import string

from xcstack.crypto.recipes import pbkdf2_sm3
from xcstack.errors import BadRequest
from xcstack.security.protocol import SecurityCode


class PasswordPolicyError(BadRequest):
    code = SecurityCode.PASSWORD_POLICY


def hash_password(password: str, scheme: str = "pbkdf2-sm3", iterations: int = 100_000) -> str:
    if scheme == "argon2id":
        from argon2 import PasswordHasher

        return str(PasswordHasher().hash(password))
    salt = os.urandom(16)
    dk = pbkdf2_sm3(password.encode(), salt, iterations, 32)
    return f"pbkdf2-sm3${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of `password` against a stored hash (any supported scheme)."""
    try:
        if encoded.startswith("$argon2id$"):
            from argon2 import PasswordHasher
            from argon2.exceptions import Argon2Error

            try:
                return bool(PasswordHasher().verify(encoded, password))
            except Argon2Error:
                return False
        scheme, iters, salt_b64, dk_b64 = encoded.split("$")
        if scheme != "pbkdf2-sm3":
            return False
        salt, want = base64.b64decode(salt_b64), base64.b64decode(dk_b64)
        got = pbkdf2_sm3(password.encode(), salt, int(iters), len(want))
        return hmac.compare_digest(got, want)
    except (ValueError, TypeError):
        return False


_DUMMY: dict[str, str] = {}


def dummy_hash(scheme: str, iterations: int) -> str:
    """A hash of a random password with the same cost, to burn the same time for unknown users."""
    key = f"{scheme}:{iterations}"
    if key not in _DUMMY:
        _DUMMY[key] = hash_password(base64.b64encode(os.urandom(18)).decode(), scheme, iterations)
    return _DUMMY[key]


def character_classes(password: str) -> int:
    classes = [
        any(c in string.ascii_lowercase for c in password),
        any(c in string.ascii_uppercase for c in password),
        any(c in string.digits for c in password),
        any(not c.isalnum() for c in password),
    ]
    # letters outside ASCII count as lower/upper by their case
    if any(c.isalpha() and c.islower() and c not in string.ascii_lowercase for c in password):
        classes[0] = True
    if any(c.isalpha() and c.isupper() and c not in string.ascii_uppercase for c in password):
        classes[1] = True
    return sum(classes)


def check_policy(password: str, username: str, min_length: int = 12, min_classes: int = 3) -> None:
    """Raise PasswordPolicyError (400 `password_policy`) naming the first rule the password breaks."""
    if len(password) < min_length:
        raise PasswordPolicyError(f"password must be at least {min_length} characters long")
    if len(password) > 1024:
        raise PasswordPolicyError("password must be at most 1024 characters long")
    n = character_classes(password)
    if n < min_classes:
        raise PasswordPolicyError(
            f"password must contain at least {min_classes} of: lower-case, upper-case, digits, symbols (has {n})"
        )
    if username and username.lower() in password.lower():
        raise PasswordPolicyError("password must not contain the user name")


def generate_password(length: int = 20) -> str:
    """A random password that satisfies the strictest policy (4 classes)."""
    import secrets

    alphabet = string.ascii_letters + string.digits + "-_.!@#%+="
    while True:
        pw = "".join(secrets.choice(alphabet) for _ in range(length))
        if character_classes(pw) == 4:
            return pw
