"""A small GGUF reader: enough of the header to accept or refuse a file before llama.cpp loads it.

GGUF (v2, v3; little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64, the
metadata (key, type, value), the tensor infos (name, dims, ggml type, offset), padding to
`general.alignment`, then the tensor data. The reader walks all of it over an mmap (the tokenizer's
arrays hold ~150k strings; nothing is copied but the values kept) and checks that the file is long
enough for every tensor: a truncated download is refused here with the tensor it cuts, instead of a
crash or a garbled answer later. The `gguf` package on PyPI would do the same, with numpy and
~400 KB of Python we do not need.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
MAX_STRING = 64 * 1024 * 1024  # one metadata string (a chat template is a few KB)
MAX_COUNT = 1 << 31  # tensors, metadata pairs, array items
MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml tensor types: (elements per block, bytes per block), as in ggml.c's type traits
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# general.file_type (llama_ftype): the quantisation the file was made with
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# metadata value types: struct format of the scalars
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# metadata we keep whole; other arrays (the tokenizer's) are walked and counted only
_KEEP_ARRAYS = frozenset({"general.tags", "general.languages"})


class GGUFError(ValueError):
    """The file is not a GGUF llama.cpp can load: the message says where and why."""


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def nbytes(self) -> int | None:
        t = GGML_TYPES.get(self.ggml_type)
        if t is None:
            return None
        n = 1
        for d in self.dims:
            n *= d
        _, block, size = t
        return (n // block) * size


@dataclass
class GGUFInfo:
    path: Path
    version: int
    size: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name", ""))

    @property
    def file_type(self) -> str:
        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int):
            return FILE_TYPES.get(ft, f"type {ft}")
        # no general.file_type: name the most common tensor type
        counts: dict[str, int] = {}
        for t in self.tensors:
            name = GGML_TYPES.get(t.ggml_type, (f"type {t.ggml_type}",))[0]
            counts[name] = counts.get(name, 0) + 1
        return max(counts, key=lambda k: counts[k]) if counts else "unknown"

    @property
    def context_length(self) -> int | None:
        v = self.metadata.get(f"{self.architecture}.context_length")
        return int(v) if isinstance(v, int) else None

    @property
    def chat_template(self) -> str | None:
        v = self.metadata.get("tokenizer.chat_template")
        return v if isinstance(v, str) else None

    def summary(self) -> dict[str, Any]:
        """What the model repository records about the file (model.json)."""
        return {
            "gguf_version": self.version,
            "architecture": self.architecture,
            "name": self.name,
            "quantisation": self.file_type,
            "context_length": self.context_length,
            "chat_template": self.chat_template is not None,
            "tensors": len(self.tensors),
            "parameters": sum(_elements(t.dims) for t in self.tensors),
        }


def _elements(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def _unpack(self, fmt: str, what: str) -> Any:
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFError(f"{self.path}: truncated header (at byte {self.pos}, reading {what})") from None
        self.pos += struct.calcsize(fmt)
        return v

    def u32(self, what: str) -> int:
        return int(self._unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self._unpack("<Q", what))

    def count(self, what: str) -> int:
        n = self.u64(what)
        if n >= MAX_COUNT:
            raise GGUFError(f"{self.path}: implausible {what} {n} at byte {self.pos - 8} (corrupt header?)")
        return n

    def string(self, what: str, keep: bool = True) -> str:
        n = self.u64(f"{what} length")
        if n > MAX_STRING:
            raise GGUFError(f"{self.path}: {what} of {n} bytes at byte {self.pos - 8} (corrupt header?)")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFError(f"{self.path}: truncated header (a {what} of {n} bytes runs past the end of the file)")
        raw = self.buf[self.pos:end] if keep else b""
        self.pos = end
        try:
            return raw.decode("utf-8") if keep else ""
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} at byte {end - n} is not UTF-8") from None

    def value(self, vtype: int, key: str, keep: bool = True) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype], key)
        if vtype == _STRING:
            return self.string(f"value of {key}", keep)
        if vtype == _ARRAY:
            itype = self.u32(f"{key} item type")
            n = self.count(f"{key} length")
            if itype in _SCALARS:  # fixed size: skipped at once unless kept
                size = struct.calcsize(_SCALARS[itype])
                if not keep or key not in _KEEP_ARRAYS:
                    if self.pos + n * size > len(self.buf):
                        raise GGUFError(f"{self.path}: truncated header (array {key} runs past the end)")
                    self.pos += n * size
                    return n
            keep_items = keep and key in _KEEP_ARRAYS
            items = [self.value(itype, key, keep_items) for _ in range(n)]
            return items if keep_items else n
        raise GGUFError(f"{self.path}: metadata {key!r} has unknown value type {vtype} (corrupt header?)")


def read_gguf(path: Path | str) -> GGUFInfo:
    """Parse and check `path`; raises GGUFError naming the problem (not GGUF, version, truncated...)."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with fh:
        size = path.stat().st_size
        if size < 24:
            raise GGUFError(f"{path}: {size} bytes; too short for a GGUF header (24 bytes)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, size)


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFInfo:
    if buf[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    r = _Reader(buf, path)
    r.pos = 4
    version = r.u32("version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version}; this reader knows versions 2 and 3")
    n_tensors = r.count("tensor count")
    n_kv = r.count("metadata count")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string("metadata key")
        vtype = r.u32(f"type of {key}")
        meta[key] = r.value(vtype, key)
    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i}")
        nd = r.u32(f"dims of {name}")
        if nd == 0 or nd > MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {nd} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(r.u64(f"dim of {name}") for _ in range(nd))
        ttype = r.u32(f"type of {name}")
        offset = r.u64(f"offset of {name}")
        tensors.append(TensorInfo(name, dims, ttype, offset))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: general.alignment {align!r} is not a power of two")
    data_offset = (r.pos + align - 1) // align * align
    info = GGUFInfo(path, version, size, meta, tensors, data_offset)
    _check_tensors(info, align)
    if not info.architecture:
        raise GGUFError(f"{path}: no general.architecture in the metadata (not a model file?)")
    return info


def _check_tensors(info: GGUFInfo, align: int) -> None:
    """Every tensor inside the file; for known types, its whole data too (a cut file is refused)."""
    if not info.tensors:
        raise GGUFError(f"{info.path}: no tensors (a vocabulary-only GGUF cannot serve chat)")
    end_needed = info.data_offset
    last = ""
    for t in info.tensors:
        if t.offset % align:
            raise GGUFError(f"{info.path}: tensor {t.name!r} at offset {t.offset}, not aligned to {align}")
        nbytes = t.nbytes
        if nbytes is None:
            info.warnings.append(f"tensor {t.name!r} has a ggml type ({t.ggml_type}) this reader does not know: "
                                 "its size is not checked")
            nbytes = 0
        end = info.data_offset + t.offset + nbytes
        if end > end_needed:
            end_needed, last = end, t.name
    if end_needed > info.size:
        raise GGUFError(f"{info.path}: truncated: tensor {last!r} ends at byte {end_needed}, the file has "
                        f"{info.size} bytes ({end_needed - info.size} missing)")
