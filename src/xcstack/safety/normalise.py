"""Text normalisation before keyword matching, so that common evasions fail.

One table, built once, maps every BMP character to its matching form: NFKC (full-width forms and
compatibility characters to their plain form), lower case, traditional Chinese to simplified (OpenCC's
`t2s` applied character by character, so the mapping stays one character to one), and *separators*
(spaces, punctuation, symbols, zero-width and other format characters) to nothing, so that letters
split by inserted characters (`法 轮`, `f.a.l.u.n`, `法\u200b轮`) join again.

The table is applied two ways with the same result: `str.translate` for short texts (a streamed chunk:
~2 us) and a numpy gather over the UTF-16 code units for long ones (2-3x faster per MB). The map from a
normalised position back to the original text is only computed when something matched
(`index_map`): matches are rare, scanning is not.

Characters outside the BMP (emoji, rare CJK extensions) are kept as they are.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported at the first long text: a worker with no policies never loads it
    import numpy as np

NUMPY_FROM = 2048  # characters: below it str.translate is faster than the numpy round trip

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
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    """The same table for the numpy gather: (code map uint16[65536], delete mask bool[65536])."""
    import numpy as np

    code = np.arange(65536, dtype=np.uint16)
    delete = np.zeros(65536, dtype=bool)
    for cp, to in tables()[0].items():
        if to is None:
            delete[cp] = True
        else:
            code[cp] = to
    return code, delete


def normalise(text: str) -> str:
    """The matching form of `text` (see the module doc)."""
    if len(text) < NUMPY_FROM:
        return text.translate(tables()[0])
    import numpy as np

    code, delete = _arrays()
    raw = text.encode("utf-16-le", "surrogatepass")
    units = np.frombuffer(raw, dtype=np.uint16)
    keep = ~delete[units]
    # a surrogate pair (astral character) maps to itself: surrogates are neither mapped nor deleted
    out = code[units][keep]
    return out.tobytes().decode("utf-16-le", "surrogatepass")


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
