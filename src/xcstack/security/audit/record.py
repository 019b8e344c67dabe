"""The audit record format: one JSON object per line, hash-chained with SM3.

A line is the canonical record (keys sorted, compact JSON, UTF-8) with `"hash"` appended as the
last key::

    {"action":..,"actor":..,...,"prev_hash":"<64 hex>","seq":N,"ts":"...","hash":"<64 hex>"}\\n

`hash = SM3(canonical record ‖ prev_hash)`, where the canonical record is the line with the
trailing `,"hash":"…"` removed and `prev_hash` is the previous record's hash as 32 raw bytes
(32 zero bytes for the first record of a chain). The hash field has a fixed width, so a verifier
recovers the exact hashed bytes by slicing, without re-serialising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes as _hashes

from xcstack.crypto.recipes import sm3 as _sm3

try:
    import orjson

    def canonical(record: dict[str, Any]) -> bytes:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - LoongArch without orjson
    import json

    def canonical(record: dict[str, Any]) -> bytes:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads


sm3 = _sm3  # the crypto capability's SM3 adapter (cryptography / OpenSSL)

GENESIS = bytes(32)
HASH_SUFFIX_LEN = len(b',"hash":"') + 64 + len(b'"}')  # 75
_HASH_PREFIX = b',"hash":"'


# The hot loops (append, verify) copy a pre-initialised SM3 context instead of building one per
# record: the same primitive as `xcstack.crypto.recipes.sm3` (cryptography / OpenSSL), ~25% cheaper per
# ~400-byte record. tests/security check both give the same digests.
_BASE = _hashes.Hash(_hashes.SM3())


def encode(record: dict[str, Any], prev: bytes) -> tuple[bytes, bytes]:
    """(line including the trailing newline, raw 32-byte hash) for `record` chained after `prev`."""
    record["prev_hash"] = prev.hex()
    body = canonical(record)
    h = _BASE.copy()
    h.update(body)
    h.update(prev)
    digest = h.finalize()
    return body[:-1] + _HASH_PREFIX + digest.hex().encode() + b'"}\n', digest


def split(line: bytes) -> tuple[bytes, bytes] | None:
    """(canonical body, hash hex) of a line without its newline; None when it is not well-formed."""
    if len(line) <= HASH_SUFFIX_LEN + 2 or line[-HASH_SUFFIX_LEN : -HASH_SUFFIX_LEN + 9] != _HASH_PREFIX:
        return None
    if line[-2:] != b'"}':
        return None
    return line[:-HASH_SUFFIX_LEN] + b"}", line[-66:-2]


def check(line: bytes, prev: bytes) -> bytes | None:
    """The raw hash of `line` (without its newline) when it verifies after `prev`, else None."""
    if len(line) <= HASH_SUFFIX_LEN + 2 or line[-HASH_SUFFIX_LEN : -HASH_SUFFIX_LEN + 9] != _HASH_PREFIX:
        return None
    if line[-2:] != b'"}':
        return None
    h = _BASE.copy()
    h.update(line[:-HASH_SUFFIX_LEN])
    h.update(b"}")
    h.update(prev)
    digest = h.finalize()
    if digest.hex().encode() != line[-66:-2]:
        return None
    return digest


def checkpoint_message(chain: str, seq: int, hash_hex: str, ts: str) -> bytes:
    """The bytes an audit checkpoint signature covers."""
    parts = [b"xcstack-audit-checkpoint-v1", chain.encode(), str(seq).encode(), hash_hex.encode(), ts.encode()]
    return b"\0".join(parts)
