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

from xcstack.crypto.sm import sm3 as _sm3

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


def encode(record: dict[str, Any], prev: bytes) -> tuple[bytes, bytes]:
    """(line including the trailing newline, raw 32-byte hash) for `record` chained after `prev`."""
    record["prev_hash"] = prev.hex()
    body = canonical(record)
    digest = sm3(body + prev)
    return body[:-1] + _HASH_PREFIX + digest.hex().encode() + b'"}\n', digest


def split(line: bytes) -> tuple[bytes, bytes] | None:
    """(canonical body, hash hex) of a line without its newline; None when it is not well-formed."""
    if len(line) <= HASH_SUFFIX_LEN + 2 or line[-HASH_SUFFIX_LEN : -HASH_SUFFIX_LEN + 9] != _HASH_PREFIX:
        return None
    if line[-2:] != b'"}':
        return None
    return line[:-HASH_SUFFIX_LEN] + b"}", line[-66:-2]


def check(line: bytes, prev: bytes) -> bytes | None:
    """The raw hash of `line` when it verifies after `prev`, else None."""
    parts = split(line)
    if parts is None:
        return None
    body, hex_hash = parts
    digest = sm3(body + prev)
    if digest.hex().encode() != hex_hash:
        return None
    return digest


def checkpoint_message(chain: str, seq: int, hash_hex: str, ts: str) -> bytes:
    """The bytes an audit checkpoint signature covers."""
    parts = [b"xcstack-audit-checkpoint-v1", chain.encode(), str(seq).encode(), hash_hex.encode(), ts.encode()]
    return b"\0".join(parts)
