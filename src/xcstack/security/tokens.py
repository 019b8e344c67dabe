"""Bearer tokens: their formats, the hash that is all the state store keeps of them, and the
process-local cache of tokens already checked (it bounds state-store reads per request)."""

from __future__ import annotations

import secrets

from xcstack.crypto.recipes import sm3
from xcstack.security.principal import Principal

SESSION_PREFIX = "xcs_"
KEY_PREFIX = "xck_"
MAX_TOKEN_LEN = 128
CACHE_MAX = 100_000  # entries; a full cache is dropped whole (a flood of distinct tokens cannot grow it)


def token_hash(token: str) -> str:
    """SM3 of the token, hex: sessions and keys are stored and looked up by this, never in clear."""
    return sm3(token.encode()).hex()


def new_session_token() -> str:
    return SESSION_PREFIX + secrets.token_urlsafe(32)  # 256 bits


def new_api_key() -> tuple[str, str]:
    """(key id, the key itself): `xck_<id>_<secret>`, the id being the lookup and the secret 256 bits."""
    kid = secrets.token_hex(8)
    return kid, f"{KEY_PREFIX}{kid}_{secrets.token_urlsafe(32)}"


class AuthCache:
    """token hash -> (checked at, principal), trusted for `ttl_s` seconds of the caller's clock."""

    def __init__(self) -> None:
        self._hits: dict[str, tuple[float, Principal]] = {}

    def get(self, th: str, now: float, ttl_s: float) -> Principal | None:
        hit = self._hits.get(th)
        if hit is not None and 0 <= now - hit[0] < ttl_s:
            return hit[1]
        return None

    def put(self, th: str, now: float, principal: Principal) -> None:
        if len(self._hits) >= CACHE_MAX:
            self._hits.clear()
        self._hits[th] = (now, principal)

    def drop(self, th: str) -> None:
        self._hits.pop(th, None)

    def clear(self) -> None:
        """Forget every check (after revocations and role changes made in this process)."""
        self._hits.clear()
