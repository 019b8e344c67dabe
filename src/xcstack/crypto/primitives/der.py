"""Minimal strict DER and the SM2 wire encodings: signatures (DER / r||s) and ciphertexts (GM/T 0009 DER,
C1C3C2, the old C1C2C3), plus PEM armour.

Strict on input (minimal lengths and integers, ranges checked) so every backend receives one canonical
encoding, whatever a client sent.
"""

from __future__ import annotations

import base64

from xcstack.crypto.errors import MalformedCiphertext, MalformedSignature
from xcstack.crypto.primitives.curve import N, P


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")  # leading 0 when the top bit is set
    return _der_tlv(0x02, body)


class _DerError(ValueError):
    pass


def _der_read(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos + 2 > len(buf) or buf[pos] != tag:
        raise _DerError("unexpected tag")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        nbytes = first & 0x7F
        if nbytes == 0 or nbytes > 2 or pos + nbytes > len(buf):
            raise _DerError("bad length")
        length = int.from_bytes(buf[pos : pos + nbytes], "big")
        if length < 0x80 or (nbytes == 2 and length < 0x100):
            raise _DerError("non-minimal length")
        pos += nbytes
    if pos + length > len(buf):
        raise _DerError("truncated")
    return buf[pos : pos + length], pos + length


def _der_read_uint(buf: bytes, pos: int) -> tuple[int, int]:
    body, pos = _der_read(buf, pos, 0x02)
    if not body or body[0] & 0x80:
        raise _DerError("negative or empty integer")
    if len(body) > 1 and body[0] == 0 and not body[1] & 0x80:
        raise _DerError("non-minimal integer")
    return int.from_bytes(body, "big"), pos


def _sig_int(b: bytes) -> bool:
    """A DER INTEGER body that is positive and minimally encoded."""
    return bool(b) and not b[0] & 0x80 and not (len(b) > 1 and b[0] == 0 and not b[1] & 0x80)


def sig_der_to_raw(der: bytes, n: int = N) -> bytes:
    """DER SEQUENCE{r, s} -> 64-byte r||s (`n`: the curve order; SM2 by default, any 256-bit curve).
    Strict: a 256-bit signature is at most 72 bytes, so every length is short-form."""
    d = bytes(der)
    size = len(d)
    if not 8 <= size <= 72 or d[0] != 0x30 or d[1] != size - 2 or d[2] != 0x02:
        raise MalformedSignature("signature is not valid DER SEQUENCE{r, s}")
    lr = d[3]
    p = 4 + lr
    if not 1 <= lr <= 33 or p + 2 > size or d[p] != 0x02:
        raise MalformedSignature("signature is not valid DER SEQUENCE{r, s}")
    ls = d[p + 1]
    if not 1 <= ls <= 33 or p + 2 + ls != size:
        raise MalformedSignature("signature is not valid DER SEQUENCE{r, s}")
    rb, sb = d[4:p], d[p + 2 :]
    if not (_sig_int(rb) and _sig_int(sb)):
        raise MalformedSignature("signature integers are negative or not minimally encoded")
    r, s = int.from_bytes(rb, "big"), int.from_bytes(sb, "big")
    if not (0 < r < n and 0 < s < n):
        raise MalformedSignature("signature r or s is out of range")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _der_uint32(b: bytes) -> bytes:
    b = b.lstrip(b"\0") or b"\0"
    if b[0] & 0x80:
        b = b"\0" + b
    return b"\x02" + bytes([len(b)]) + b


def sig_raw_to_der(raw: bytes, n: int = N) -> bytes:
    """64-byte r||s -> DER SEQUENCE{r, s}."""
    if len(raw) != 64:
        raise MalformedSignature(f"raw signature must be 64 bytes (r||s), got {len(raw)}")
    raw = bytes(raw)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    if not (0 < r < n and 0 < s < n):
        raise MalformedSignature("signature r or s is out of range")
    body = _der_uint32(raw[:32]) + _der_uint32(raw[32:])
    return b"\x30" + bytes([len(body)]) + body


def ct_der_to_c1c3c2(der: bytes) -> bytes:
    """GM/T 0009 DER SEQUENCE{x, y, hash, ciphertext} -> 04||x||y || C3 || C2."""
    try:
        body, end = _der_read(bytes(der), 0, 0x30)
        if end != len(der):
            raise _DerError("trailing data")
        x, pos = _der_read_uint(body, 0)
        y, pos = _der_read_uint(body, pos)
        c3, pos = _der_read(body, pos, 0x04)
        c2, pos = _der_read(body, pos, 0x04)
        if pos != len(body):
            raise _DerError("trailing data in sequence")
    except _DerError as exc:
        raise MalformedCiphertext(f"SM2 ciphertext is not valid DER: {exc}") from None
    if len(c3) != 32 or not c2 or x >= P or y >= P:
        raise MalformedCiphertext("SM2 ciphertext fields out of range")
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big") + c3 + c2


def split_c1c3c2(raw: bytes) -> tuple[int, int, bytes, bytes]:
    """(04||)x||y || C3 || C2 -> (x, y, C3, C2); only the minimum length is checked."""
    if len(raw) >= 1 and raw[0] == 0x04:
        raw = raw[1:]
    if len(raw) < 64 + 32 + 1:
        raise MalformedCiphertext("SM2 ciphertext is too short (C1 64 + C3 32 + C2 >= 1 bytes)")
    x, y = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")
    return x, y, raw[64:96], raw[96:]


def ct_c1c3c2_to_der(raw: bytes) -> bytes:
    """(04||)x||y || C3 || C2 -> GM/T 0009 DER."""
    x, y, c3, c2 = split_c1c3c2(bytes(raw))
    body = _der_int(x) + _der_int(y) + _der_tlv(0x04, c3) + _der_tlv(0x04, c2)
    return _der_tlv(0x30, body)


def ct_c1c2c3_to_c1c3c2(raw: bytes) -> bytes:
    """Old (2010 draft) order C1||C2||C3 -> C1||C3||C2 (both with the 04 prefix)."""
    raw = bytes(raw)
    if raw[:1] == b"\x04":
        raw = raw[1:]
    if len(raw) < 64 + 32 + 1:
        raise MalformedCiphertext("SM2 ciphertext is too short")
    return b"\x04" + raw[:64] + raw[-32:] + raw[64:-32]


def ct_c1c3c2_to_c1c2c3(raw: bytes) -> bytes:
    """C1||C3||C2 -> the old (2010 draft) order C1||C2||C3, with the 04 prefix."""
    x, y, c3, c2 = split_c1c3c2(bytes(raw))
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big") + c2 + c3


def pem_encode(label: str, der: bytes) -> str:
    """PEM armour of `der` (64-character lines)."""
    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"
