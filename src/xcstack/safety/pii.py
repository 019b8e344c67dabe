"""Personal information, validated, not bare regexes: a number that fails its check is not flagged.

| detector | what | validation |
|---|---|---|
| `id_card` | 居民身份证号码, 18 characters | GB 11643-1999 ISO 7064 MOD 11-2 check character, a real birth date |
| `mobile` | mainland mobile number, 11 digits (optionally +86 / 86) | 1[3-9] prefix |
| `bank_card` | bank card, 16-19 digits (groups of digits with spaces or hyphens allowed) | Luhn |
| `uscc` | 统一社会信用代码, 18 characters | GB 32100-2015 check character (MOD 31) |
| `email` | e-mail address | local part and a dotted domain with a letter TLD |
| `ip` | IPv4 / IPv6 address | `ipaddress` parses it |

Scanning stops only where a detector could match, then grows a token around each stop and classifies
it. A stop is the first digit of a run that a number detector could start from (6 digits in a row, 11+
digits joined by single spaces or hyphens, or a dotted quad), an `@`, or `:hex{0,4}:`. The stops are
found by one possessive regex that steps over whole digit runs no number can start from (sre used to
try every branch at every digit: digit-heavy text scanned at ~25 MB/s); a long text (`NUMPY_PII_FROM`) finds them with
numpy over whole runs (run lengths, single-separator links), the same positions
(tests/safety/test_detectors.py checks both agree). A word of letters and digits is classified once.
Full-width digits and letters are folded first (one character to one: positions stay those of the
original text).
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only for long texts (`_stops_numpy`)
    import numpy as np

KINDS = ("id_card", "mobile", "bank_card", "uscc", "email", "ip")

# full-width ASCII (U+FF01..FF5E) -> ASCII, and the ideographic full stop / at sign variants
_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_WIDTH[0x3002] = ord(".")  # 。 (an evasion in e-mail addresses and IPs)

# full-width digits, letters and the characters addresses use (not the full-width punctuation of all
# Chinese text: folding would then run on every text)
_WIDE = re.compile("[\uff10-\uff1a\uff21-\uff3a\uff41-\uff5a\uff20\uff0e\uff0b\uff0d]")
# the characters `_WIDTH` folds that any pattern below can tell apart from others (full-width commas and
# the like stay: no pattern looks at them); the ideographic full stop only once a text is folded
_FOLDED = re.compile("[\uff10-\uff1a\uff21-\uff3a\uff41-\uff5a\uff20\uff0e\uff0b\uff0d\uff05\uff3f\u3002]")
# Every number detector needs 6 digits in a row (a 统一社会信用代码's region code) or 11+ digits with
# single spaces or hyphens between (grouped card and mobile numbers); IPv4 a dotted quad (a run, then
# `.d{1,3}` twice and `.d`). After a run's first digit:
_RUN_TAIL = r"[0-9]{5}|(?:[ \-]?+[0-9]){10}|[0-9]*+\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]"
_RUN_AT = re.compile(r"[0-9](?:" + _RUN_TAIL + ")")
# what lies before the next stop, in one match: anything but a digit, `@` or `:`; a whole digit run that
# no number can start from (possessive: sre never retries inside it); a `:` not followed by hex{0,4}:
_SKIP = re.compile(r"(?:[^0-9@:]++|(?!" + _RUN_AT.pattern + r")[0-9]++|:(?![0-9A-Fa-f]{0,4}:))*+")
_DIGIT_RUN = re.compile(r"[0-9]*")
_COLON = re.compile(r"[0-9A-Fa-f]{0,4}:")
_ALNUM = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_WORD_REST = re.compile(r"[0-9A-Za-z+]*")  # a token's left edge is found over these: one word, one token
# a number or code: digit groups joined by single spaces or hyphens (6222 0200 1234 5678), or dots (IPv4)
_TOKEN = re.compile(r"\+?[0-9A-Za-z]+(?:[ \-][0-9]+|\.[0-9A-Za-z]+)*")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+\-]{1,64}\Z")
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}"
                           r"[A-Za-z0-9])?)*\.[A-Za-z]{2,24}")
_IP6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_MOBILE = re.compile(r"(?:\+?86)?1[3-9][0-9]{9}")
_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_RE = re.compile(r"[0-9A-HJ-NP-RTUWXY]{2}[0-9]{6}[0-9A-HJ-NP-RTUWXY]{10}")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)


@dataclass(frozen=True, slots=True)
class PiiHit:
    kind: str
    start: int
    end: int


def id_card_valid(s: str) -> bool:
    if len(s) != 18 or not s[:17].isdigit() or s[17] not in "0123456789Xx":
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=True))
    if _ID_CHECK[total % 11] != s[17].upper():
        return False
    try:
        born = dt.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return dt.date(1890, 1, 1) <= born <= dt.date.today()


def luhn_valid(s: str) -> bool:
    if not s.isdigit() or not 16 <= len(s) <= 19:
        return False
    total = 0
    for i, c in enumerate(reversed(s)):
        d = ord(c) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def uscc_valid(s: str) -> bool:
    if len(s) != 18 or not _USCC_RE.fullmatch(s):
        return False
    total = sum(_USCC_CHARS.index(c) * w for c, w in zip(s[:17], _USCC_WEIGHTS, strict=True))
    return _USCC_CHARS[(31 - total % 31) % 31] == s[17]


def _classify_number(token: str) -> str | None:
    """The detector a token (separators included) satisfies, strongest check first."""
    compact = token.replace(" ", "").replace("-", "")
    if "." in token:
        try:
            ipaddress.IPv4Address(token)
            return "ip"
        except ValueError:
            return None
    if len(compact) == 18:
        if id_card_valid(compact):
            return "id_card"
        if uscc_valid(compact.upper()) and compact == compact.upper():
            return "uscc"
    if _MOBILE.fullmatch(compact):
        return "mobile"
    if luhn_valid(compact):
        return "bank_card"
    return None


def scan(text: str, kinds: frozenset[str] | None = None) -> list[PiiHit]:
    """Validated personal information in `text` (positions in `text`); `kinds` None: all detectors."""
    want = frozenset(KINDS) if kinds is None else kinds
    if not want:
        return []
    folded, stops = _stops(text)
    out: list[PiiHit] = []
    pos = 0
    n = len(folded)
    for i in stops:
        while i >= pos:
            ch = folded[i]
            if ch in _AT:
                kind, detect = _AT[ch]
                hit = detect(folded, i) if kind in want else None
                pos = hit.end if hit is not None else i + 1
            else:
                hit, pos = _number(folded, i, want, text)
            if hit is not None:
                out.append(hit)
            # a hit that ends inside a digit run (an IPv6 address cut at 45 characters): the rest of
            # the run is a stop of its own where it could start a number
            if not (hit is not None and 0 < pos < n and folded[pos - 1] in _DIGITS and _RUN_AT.match(folded, pos)):
                break
            i = pos
    return out


_DIGITS = frozenset("0123456789")
NUMPY_PII_FROM = 8192  # characters: below it numpy's fixed cost (~70 us) is more than the regex takes


def _stops(text: str) -> tuple[str, list[int]]:
    """(`text` with full-width forms folded, the positions where scanning stops, in order)."""
    if len(text) >= NUMPY_PII_FROM and not text.isascii():
        found = _stops_numpy(text)
        if found is not None:
            return found
    return _stops_regex(text)


def _stops_regex(text: str) -> tuple[str, list[int]]:
    folded = _FOLDED.sub(_fold_char, text) if _WIDE.search(text) else text
    stops: list[int] = []
    n = len(folded)
    skip, run = _SKIP.match, _DIGIT_RUN.match
    pos = skip(folded).end()  # type: ignore[union-attr]  # matches the empty string at worst
    while pos < n:
        stops.append(pos)
        pos = skip(folded, run(folded, pos).end() if folded[pos] in _DIGITS else pos + 1).end()  # type: ignore[union-attr]  # matches the empty string at worst
    return folded, stops


def _fold_char(m: re.Match[str]) -> str:
    return chr(_WIDTH[ord(m.group())])


def _number(text: str, i: int, want: frozenset[str], original: str) -> tuple[PiiHit | None, int]:
    """The number or code at stop `i` (a digit) of the folded `text`, and where scanning goes on:
    after its word, so each word of letters and digits is looked at once."""
    start = i
    while start > 0 and (text[start - 1] in _ALNUM or text[start - 1] == "+"):
        start -= 1
    word_end = _WORD_REST.match(text, i).end()  # type: ignore[union-attr]  # matches the empty string at worst
    # inside an e-mail or a longer dotted thing; a sentence's 。 (folded to `.` for addresses) is not
    if start > 0 and text[start - 1] in ".@" and original[start - 1] != "\u3002":
        return None, word_end
    tm = _TOKEN.match(text, start)
    if tm is None:
        return None, word_end
    end = tm.end()
    if end < len(text) and text[end] in "@:":
        return None, word_end  # an e-mail's local part or an IPv6 address: their own detectors
    # every detector needs 7+ characters (an IPv4 address at least): shorter tokens are skipped cheaply
    kind = _classify_number(text[start:end].lstrip("+")) if end - start >= 7 else None
    if kind is None and (stop := original.find("\u3002", start, end)) >= 0:
        # not an address with 。 for dots (folded to `.`): the sentence ends at the 。
        end = stop
        kind = _classify_number(text[start:end].lstrip("+")) if end - start >= 7 else None
    hit = PiiHit(kind, start, end) if kind is not None and kind in want else None
    return hit, max(end, word_end)


def _stops_numpy(text: str) -> tuple[str, list[int]] | None:
    """`_stops` over whole digit runs with numpy: the same positions as `_STOP` (None: a character
    outside the BMP, where UTF-16 positions are not those of the text)."""
    import numpy as np

    fold, cls = _np_tables()
    units = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), dtype=np.uint16)
    if len(units) != len(text):
        return None
    folded = text
    c = cls[units]  # 1 digit, 2 space or hyphen, 3 dot, 4 @, 5 colon, 6 a `_WIDE` character, 0 else
    if (c == 6).any():
        units = fold[units]
        folded = units.tobytes().decode("utf-16-le", "surrogatepass")
        c = cls[units]
    edges = np.diff((c == 1).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    lens = np.flatnonzero(edges == -1) - starts
    stops = starts[_qualified(c, starts, lens)] if len(starts) else starts
    stops = np.concatenate((stops, np.flatnonzero(c == 4)))
    colons = [i for i in np.flatnonzero(c == 5).tolist() if _COLON.match(folded, i + 1)]
    if colons:
        stops = np.concatenate((stops, np.array(colons, dtype=stops.dtype)))
    stops.sort()
    return folded, stops.tolist()


def _qualified(c: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Which digit runs (`starts`, `lens`) `_RUN_AT` matches at their first digit, run by run."""
    import numpy as np

    ends = starts + lens
    adjacent = starts[1:] == ends[:-1] + 1  # run k and k+1 one character apart: the class of that one
    gap = c[ends[:-1]]
    sep = adjacent & (gap == 2)
    dot = adjacent & (gap == 3)
    ok = lens >= 6
    # 11+ digits along runs linked by single spaces or hyphens, from this run to the end of its chain
    breaks = np.append(~sep, True)  # run k ends a chain
    chain_end = np.flatnonzero(breaks)[np.concatenate(([0], np.cumsum(breaks[:-1])))]
    total = np.cumsum(lens)
    ok |= total[chain_end] - total + lens >= 11
    # a dotted quad: this run, then .d{1,3} .d{1,3} .d
    r = len(lens)
    if r >= 4:
        short = lens <= 3
        ok[:r - 3] |= dot[:r - 3] & short[1:r - 2] & dot[1:r - 2] & short[2:r - 1] & dot[2:r - 1]
    return ok


@functools.cache
def _np_tables() -> tuple[np.ndarray, np.ndarray]:
    """(the `_FOLDED` fold as uint16[65536], the character classes of `_stops_numpy` as uint8[65536])."""
    import numpy as np

    fold = np.arange(65536, dtype=np.uint16)
    for cp, to in _WIDTH.items():
        if _FOLDED.match(chr(cp)):  # the same text as `_stops_regex` folds
            fold[cp] = to
    cls = np.zeros(65536, dtype=np.uint8)
    cls[ord("0"):ord("9") + 1] = 1
    for ch, k in ((" ", 2), ("-", 2), (".", 3), ("@", 4), (":", 5)):
        cls[ord(ch)] = k
    for start, end in ((0xFF10, 0xFF1A), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A)):  # as `_WIDE`
        cls[start:end + 1] = 6
    for ch in "\uff20\uff0e\uff0b\uff0d":
        cls[ord(ch)] = 6
    return fold, cls


# '@' and ':' stops: (detector, function finding it at the stop)
_AT: dict[str, tuple[str, Callable[[str, int], PiiHit | None]]] = {}


def _email(text: str, at: int) -> PiiHit | None:
    left = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
    if left is None:
        return None
    start = left.start()
    while start < at and text[start] == ".":
        start += 1
    if start == at:
        return None
    dom = _EMAIL_DOMAIN.match(text, at + 1)
    if dom is None:
        return None
    return PiiHit("email", start, dom.end())


def _ipv6(text: str, colon: int) -> PiiHit | None:
    start = colon
    while start > 0 and start > colon - 45 and text[start - 1] in "0123456789abcdefABCDEF:.":
        start -= 1
    m = _IP6.match(text, start)
    if m is None:
        return None
    cand = m.group().rstrip(".")
    lead = len(cand) - len(cand.lstrip("."))  # a sentence's 。 before it (folded to `.`)
    cand, start = cand[lead:], start + lead
    if cand.count(":") < 2:
        return None
    try:
        ipaddress.IPv6Address(cand)
    except ValueError:
        return None
    return PiiHit("ip", start, start + len(cand))


_AT.update({"@": ("email", _email), ":": ("ip", _ipv6)})
