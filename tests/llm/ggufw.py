"""A tiny GGUF writer for tests: a valid file of a few KB (metadata + F32 tensors), written by the format's
rules independently of the reader under test."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I", 7) + struct.pack("<?", v)
    if isinstance(v, int):
        return struct.pack("<I", 4) + struct.pack("<I", v)
    if isinstance(v, float):
        return struct.pack("<I", 6) + struct.pack("<f", v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _str(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<I", 9) + struct.pack("<IQ", 8, len(v)) + b"".join(_str(x) for x in v)
    if isinstance(v, list):
        return struct.pack("<I", 9) + struct.pack("<IQ", 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)
    raise TypeError(v)


def gguf_bytes(*, version: int = 3, arch: str = "qwen2", ctx: int = 4096, file_type: int = 15,
               template: str | None = TEMPLATE, tensors: tuple[tuple[str, tuple[int, ...]], ...] = (
                   ("token_embd.weight", (8, 16)), ("output_norm.weight", (8,))), align: int = 32) -> bytes:
    meta: dict[str, Any] = {"general.architecture": arch, "general.name": "test model", f"{arch}.context_length": ctx,
                            "general.file_type": file_type,
                            "tokenizer.ggml.tokens": [f"t{i}" for i in range(50)],
                            "tokenizer.ggml.token_type": list(range(50))}
    if template is not None:
        meta["tokenizer.chat_template"] = template
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    for k, v in meta.items():
        head += _str(k) + _value(v)
    offset = 0
    data = b""
    for name, dims in tensors:
        head += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", 0, offset)  # F32
        n = 1
        for d in dims:
            n *= d
        blob = struct.pack(f"<{n}f", *([0.5] * n))
        pad = (-len(blob)) % align
        data += blob + b"\0" * pad
        offset += len(blob) + pad
    head += b"\0" * ((-len(head)) % align)
    return head + data


def write_gguf(path: Path, **kw: Any) -> Path:
    path.write_bytes(gguf_bytes(**kw))
    return path
