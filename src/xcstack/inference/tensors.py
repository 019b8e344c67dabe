"""Tensor datatypes and the xcstack tensor layout shared by HTTP (KServe v2) and IPC.

Layout: little-endian, row-major (C order). BYTES tensors are a sequence of elements, each a 4-byte
little-endian length followed by that many bytes (the KServe v2 binary extension's layout).
Decoding never copies fixed-size tensors: `numpy.frombuffer` over a memoryview of the received body.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xcstack.errors import BadRequest
from xcstack.inference.protocol import InferenceCode

# KServe v2 datatype -> numpy dtype (little-endian). BYTES is object (Python bytes) after decoding.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_KIND = {v.str.lstrip("<|="): k for k, v in DTYPES.items() if k != "BYTES"}
ONNX_TO_DATATYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_LEN = struct.Struct("<I")


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in ("S", "U"):
        return "BYTES"
    key = arr.dtype.str.lstrip("<|=")
    try:
        return _BY_KIND[key]
    except KeyError:
        raise ValueError(f"unsupported dtype {arr.dtype}") from None


def element_count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def decode_bytes_tensor(view: memoryview, count: int, name: str) -> np.ndarray:
    """BYTES elements (4-byte LE length + bytes) -> object array of `bytes`; 400 naming the tensor if bad."""
    pos, size = 0, view.nbytes
    if count > size // 4:  # each element has its 4-byte length: refuse before allocating `count` slots
        raise BadRequest(
            f"input '{name}': {size} bytes cannot hold {count} BYTES elements (4-byte length each)",
            code=InferenceCode.INVALID_TENSOR_SIZE,
            param=name,
        )
    out = np.empty(count, dtype=object)
    for i in range(count):
        if pos + 4 > size:
            raise BadRequest(
                f"input '{name}': BYTES data ends inside element {i} (expected {count} elements)",
                code=InferenceCode.INVALID_TENSOR_SIZE,
                param=name,
            )
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > size:
            raise BadRequest(
                f"input '{name}': BYTES element {i} claims {n} bytes but only {size - pos} remain",
                code=InferenceCode.INVALID_TENSOR_SIZE,
                param=name,
            )
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != size:
        raise BadRequest(
            f"input '{name}': {size - pos} bytes left after {count} BYTES elements",
            code=InferenceCode.INVALID_TENSOR_SIZE,
            param=name,
        )
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def tensor_bytes(arr: np.ndarray) -> bytes | memoryview:
    """The raw bytes of `arr` in the xcstack layout (no copy for contiguous fixed-size arrays)."""
    if datatype_of(arr) == "BYTES":
        return encode_bytes_tensor(arr)
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a).cast("B")  # type: ignore[arg-type]


def from_buffer(view: memoryview, datatype: str, shape: Sequence[int], name: str) -> np.ndarray:
    """A tensor over `view` (no copy for fixed-size types); 400 naming the tensor on a size mismatch."""
    count = element_count(shape)
    if datatype == "BYTES":
        return decode_bytes_tensor(view, count, name).reshape(tuple(shape))
    dtype = DTYPES[datatype]
    expected = count * dtype.itemsize
    if view.nbytes != expected:
        raise BadRequest(
            f"input '{name}': {view.nbytes} bytes of data, but shape {list(shape)} of {datatype} needs {expected}",
            code=InferenceCode.INVALID_TENSOR_SIZE,
            param=name,
        )
    return np.frombuffer(view, dtype=dtype).reshape(tuple(shape))


@dataclass(frozen=True)
class Packed:
    """Tensors packed for one IPC frame: descriptors for the meta and one payload."""

    descriptors: list[dict[str, Any]]
    parts: list[bytes | memoryview]
    nbytes: int

    def payload(self) -> bytes:
        return b"".join(self.parts)


def pack(tensors: dict[str, np.ndarray]) -> Packed:
    descs: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    offset = 0
    for name, arr in tensors.items():
        raw = tensor_bytes(arr)
        n = memoryview(raw).nbytes
        descs.append(
            {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape), "offset": offset, "nbytes": n}
        )
        parts.append(raw)
        offset += n
    return Packed(descs, parts, offset)


def unpack(descriptors: list[dict[str, Any]], payload: memoryview) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for d in descriptors:
        off, n = int(d["offset"]), int(d["nbytes"])
        out[str(d["name"])] = from_buffer(payload[off : off + n], str(d["datatype"]), d["shape"], str(d["name"]))
    return out
