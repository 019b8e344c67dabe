"""The SM2 curve's public domain parameters (GM/T 0003.5) and checks on public points.

Only public values are computed here (point validation, decompression); every operation on a secret
scalar runs in the native backend (`sm2_backends.py`).
"""

from __future__ import annotations

from xcstack.crypto.errors import MalformedKey

P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0
CURVE_BYTES = b"".join(v.to_bytes(32, "big") for v in (A, B, GX, GY))  # a||b||xG||yG, as Z hashes them


def on_curve(x: int, y: int) -> bool:
    """(x, y) is a point of the SM2 curve with coordinates in range."""
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x + A * x + B)) % P == 0


def decompress(prefix: int, x: int) -> int:
    """y of the point with abscissa `x` whose parity matches the 02/03 `prefix`."""
    rhs = (x * x * x + A * x + B) % P
    y = pow(rhs, (P + 1) // 4, P)  # P % 4 == 3
    if y * y % P != rhs:
        raise MalformedKey("SM2 public key: x is not on the curve")
    if (y & 1) != (prefix & 1):
        y = P - y
    return y
