"""Personal information, validated, not bare regexes: a number that fails its check is not flagged.

| detector | what | validation |
|---|---|---|
| `id_card` | 居民身份证号码, 18 characters | GB 11643-1999 ISO 7064 MOD 11-2 check character, a real birth date |
| `mobile` | mainland mobile number, 11 digits (optionally +86 / 86) | 1[3-9] prefix |
| `bank_card` | bank card, 16-19 digits (groups of digits with spaces or hyphens allowed) | Luhn |
| `uscc` | 统一社会信用代码, 18 characters | GB 32100-2015 check character (MOD 31) |
| `email` | e-mail address | local part and a dotted domain with a letter TLD |
| `ip` | IPv4 / IPv6 address | `ipaddress` parses it |

Scanning stops only where a detector could match (`_PRE`: a run of 6+ digits, a dotted quad, `@`,
`:hex:`), found by one compiled regex, then grows a token around each stop and classifies it.
Full-width digits and letters are folded first (one character to one: positions stay those of the
original text).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass

KINDS = ("id_card", "mobile", "bank_card", "uscc", "email", "ip")

# full-width ASCII (U+FF01..FF5E) -> ASCII, and the ideographic full stop / at sign variants
_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_WIDTH[0x3002] = ord(".")  # 。 (an evasion in e-mail addresses and IPs)

# full-width digits, letters and the characters addresses use (not the full-width punctuation of all
# Chinese text: folding would then run on every text)
_WIDE = re.compile("[\uff10-\uff1a\uff21-\uff3a\uff41-\uff5a\uff20\uff0e\uff0b\uff0d]")
# the pre-scan: one compiled regex stops only where a detector could match. Every number detector
# needs 6 digits in a row (a 统一社会信用代码's region code) or 11+ digits with single spaces or hyphens
# between (grouped card and mobile numbers); IPv4 a dotted quad; e-mail an `@`; IPv6 two colons with at
# most 4 hex digits between. Ordinary short numbers, dates and versions never reach Python. Written as
# one character class first (sre's fast prefix scan), then look-behind-guarded branches.
_PRE = re.compile(r"[0-9@:](?:(?<=[0-9])(?:[0-9]{5}|(?:[ \-]?[0-9]){10})|(?<=[0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}"
                  r"|(?<=@)|(?<=:)[0-9A-Fa-f]{0,4}:)")
_ALNUM = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
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
    folded = text.translate(_WIDTH) if _WIDE.search(text) else text
    out: list[PiiHit] = []
    pos = 0
    n = len(folded)
    hot = _PRE.search
    while pos < n:
        m = hot(folded, pos)
        if m is None:
            break
        i = m.start()
        ch = folded[i]
        if ch == "@":
            pos = i + 1
            if "email" in want:
                hit = _email(folded, i)
                if hit is not None:
                    out.append(hit)
                    pos = hit.end
            continue
        if ch == ":":
            pos = i + 1
            if "ip" in want:
                hit = _ipv6(folded, i)
                if hit is not None:
                    out.append(hit)
                    pos = hit.end
            continue
        # a digit: the token around it, from its left edge
        start = i
        while start > 0 and (folded[start - 1] in _ALNUM or folded[start - 1] == "+"):
            start -= 1
        if start > 0 and folded[start - 1] in ".@":  # inside an e-mail or a longer dotted thing
            pos = i + 1
            continue
        tm = _TOKEN.match(folded, start)
        end = tm.end() if tm else i + 1
        if end < n and folded[end] in "@:":
            pos = i + 1  # an e-mail's local part or an IPv6 address: their own detectors
            continue
        # every detector needs 7+ characters (an IPv4 address at least): shorter tokens are skipped cheaply
        kind = _classify_number(folded[start:end].lstrip("+")) if tm and end - start >= 7 else None
        if kind is not None and kind in want:
            out.append(PiiHit(kind, start, end))
        pos = max(end, i + 1)
    return out


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
    if cand.count(":") < 2:
        return None
    try:
        ipaddress.IPv6Address(cand)
    except ValueError:
        return None
    return PiiHit("ip", start, start + len(cand))
