"""The one binary framing every side process speaks (model workers, the HSM owner).

    header (20 bytes, little-endian): magic b"XC" | version u8 | type u8 | flags u16
                                      | request id u32 | meta length u32 | payload length u32
    meta:    msgpack map (op name, tensor descriptors, error codes, ...)
    payload: raw bytes (tensor data in the xcstack tensor layout, ciphertext, ...)

Payloads are never copied into the meta; receivers get a memoryview over one buffer.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = b"XC"
VERSION = 1
HEADER = struct.Struct("<2sBBHIII")
MAX_META = 16 * 1024 * 1024
MAX_PAYLOAD = 1024 * 1024 * 1024


class MsgType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    CANCEL = 4


class FramingError(Exception):
    """The peer sent something that is not an xcstack frame; the connection must be dropped."""


@dataclass(slots=True)
class Frame:
    msg_type: MsgType
    request_id: int
    flags: int
    meta: dict[str, Any]
    payload: memoryview


def encode_frame(
    msg_type: MsgType,
    request_id: int,
    meta: dict[str, Any] | None = None,
    payload: bytes | bytearray | memoryview = b"",
    flags: int = 0,
) -> list[bytes | bytearray | memoryview]:
    """Frame parts ready for `writer.writelines` (the payload is not copied)."""
    meta_bytes = msgpack.packb(meta or {}, use_bin_type=True)
    size = memoryview(payload).nbytes
    header = HEADER.pack(MAGIC, VERSION, int(msg_type), flags, request_id, len(meta_bytes), size)
    parts: list[bytes | bytearray | memoryview] = [header, meta_bytes]
    if size:
        parts.append(payload)
    return parts


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame; raises asyncio.IncompleteReadError at EOF and FramingError on garbage."""
    head = await reader.readexactly(HEADER.size)
    magic, version, msg_type, flags, request_id, meta_len, payload_len = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise FramingError(f"bad frame header {head[:4]!r}")
    if meta_len > MAX_META or payload_len > MAX_PAYLOAD:
        raise FramingError(f"frame too large: meta {meta_len}, payload {payload_len}")
    try:
        kind = MsgType(msg_type)
    except ValueError:
        raise FramingError(f"unknown message type {msg_type}") from None
    body = await reader.readexactly(meta_len + payload_len)
    view = memoryview(body)
    meta = msgpack.unpackb(view[:meta_len], raw=False) if meta_len else {}
    if not isinstance(meta, dict):
        raise FramingError("frame meta is not a map")
    return Frame(kind, request_id, flags, meta, view[meta_len:])
