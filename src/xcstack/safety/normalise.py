"""Text normalisation before keyword matching, so that common evasions fail.

One table, built once, maps every BMP character to its matching form: NFKC (full-width forms and
compatibility characters to their plain form), lower case, traditional Chinese to simplified (OpenCC's
`t2s` applied character by character, so the mapping stays one character to one), and *separators*
(spaces, punctuation, symbols, zero-width and other format characters) to nothing, so that letters
split by inserted characters (`法 轮`, `f.a.l.u.n`, `法\u200b轮`) join again.

The table is applied three ways with the same result (bench/safety.py, CPU time):
- ASCII text: `bytes.translate` with a 256-byte table and the separators deleted (no per-character
  Python work at all);
- short other text (a prompt, a streamed chunk): `str.translate` over a *list* of 65,536 entries —
  every lookup hits, where a sparse dict raised and caught KeyError for each unmapped character
  (~4x slower: 700 Chinese characters ~28 us instead of ~105 us);
- long text: one numpy gather over the UTF-16 code units (deleted characters map to U+0000, itself a
  deleted control character, then are dropped in one pass).
The map from a normalised position back to the original text is only computed when something matched
(`index_map`): matches are rare, scanning is not.

Characters outside the BMP (emoji, rare CJK extensions) are kept as they are.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported at the first long text: a worker with no policies never loads it
    import numpy as np

NUMPY_FROM = 512  # characters of non-ASCII text: below it the list `str.translate` beats numpy's fixed cost

# separators that Unicode categories alone would miss or that NFKC turns into something else
_EXTRA_SEPARATORS = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"


def _is_separator(ch: str) -> bool:
    cat = unicodedata.category(ch)
    # Z*: spaces; P*: punctuation; S*: symbols; Cc/Cf: controls and format characters (zero-width)
    return cat[0] in "ZPS" or cat in ("Cc", "Cf") or ch in _EXTRA_SEPARATORS


@functools.cache
def _t2s() -> dict[int, str]:
    """Traditional -> simplified, one character to one (OpenCC `t2s` per character)."""
    import opencc

    conv = opencc.OpenCC("t2s")
    out: dict[int, str] = {}
    for start, end in ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)):
        for cp in range(start, end + 1):
            ch = chr(cp)
            s = conv.convert(ch)
            if s != ch and len(s) == 1:
                out[cp] = s
    return out


@functools.cache
def tables() -> tuple[dict[int, int | None]]:
    """(the `str.translate` table,); built once (~0.3 s)."""
    t2s = _t2s()
    table: dict[int, int | None] = {}
    for cp in range(65536):
        if 0xD800 <= cp <= 0xDFFF:
            continue  # surrogates: never alone in a str
        ch = chr(cp)
        if _is_separator(ch):
            table[cp] = None
            continue
        n = unicodedata.normalize("NFKC", ch)
        if len(n) != 1 or _is_separator(n):
            # "①" -> "1" is one char; "㈱" -> "(株)" is not: keep the first letter-like char, if any
            letters = [c for c in n if not _is_separator(c)]
            if not letters:
                table[cp] = None
                continue
            n = letters[0]
        n = n.lower()
        if len(n) != 1:
            n = n[0]
        n = t2s.get(ord(n), n)
        if n != ch and ord(n) < 65536:
            table[cp] = ord(n)
    return (table,)


@functools.cache
def _ascii_table() -> tuple[bytes, bytes]:
    """The table's ASCII part for `bytes.translate`: (256-byte map, the bytes to delete)."""
    table = tables()[0]
    trans = bytearray(range(256))
    delete = bytearray()
    for cp in range(128):
        to = table.get(cp, cp)
        if to is None:
            delete.append(cp)
        else:
            trans[cp] = to  # ASCII maps to ASCII (lower case)
    return bytes(trans), bytes(delete)


@functools.cache
def _list_table() -> list[int | None]:
    """The table as a list indexed by code point (BMP): `str.translate` finds every entry."""
    table = tables()[0]
    return [table.get(cp, cp) for cp in range(65536)]


@functools.cache
def _array() -> np.ndarray:
    """The table for the numpy gather: uint16[65536], a deleted character -> 0 (U+0000 is deleted too)."""
    import numpy as np

    code = np.arange(65536, dtype=np.uint16)
    for cp, to in tables()[0].items():
        code[cp] = 0 if to is None else to
    return code


def normalise(text: str) -> str:
    """The matching form of `text` (see the module doc)."""
    if text.isascii():
        trans, delete = _ascii_table()
        return text.encode("ascii").translate(trans, delete).decode("ascii")
    if len(text) < NUMPY_FROM:
        return text.translate(_list_table())  # astral characters: IndexError, kept as they are
    import numpy as np

    units = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), dtype=np.uint16)
    # a surrogate pair (astral character) maps to itself: surrogates are neither mapped nor deleted
    out = np.take(_array(), units)  # take/compress: ~15% less CPU than fancy and boolean indexing
    return out.compress(out != 0).tobytes().decode("utf-16-le", "surrogatepass")


def index_map(text: str) -> list[int]:
    """For each character of `normalise(text)`, its index in `text` (the slow path, on a match)."""
    table = tables()[0]
    out: list[int] = []
    for i, ch in enumerate(text):
        if table.get(ord(ch), 0) is None:
            continue
        out.append(i)
    return out


def original_span(imap: list[int], start: int, end: int) -> tuple[int, int]:
    """The span [start, end) of the normalised text as a span of the original text."""
    return imap[start], imap[end - 1] + 1
