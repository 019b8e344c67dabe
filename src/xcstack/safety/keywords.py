"""Keyword lists matched with Aho-Corasick, after normalisation (`normalise.py`).

A list is a UTF-8 file, one word a line (`#` starts a comment line, blank lines are skipped); it is
identified by the sha256 of its bytes, which every record it causes carries. All lists go into one
automaton; each word remembers which lists hold it.

The automaton is `ahocorasick_rs` (the Rust `aho-corasick` crate, maintained, Apache-2.0; abi3 wheels
for x86_64 and aarch64) over UTF-8 bytes: ~5x the throughput of pyahocorasick over the same bytes
(bench/safety.py). pyahocorasick over `str` was slower still: it walks code points and searches a
node's children one by one (the root of a Chinese list has thousands). Matches are overlapping (a
word inside a longer word of another list is found too). Byte offsets are turned back into
character offsets only for a match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcstack.safety.normalise import normalise


@dataclass(frozen=True, slots=True)
class KeywordList:
    name: str
    category: str
    sha256: str
    words: int


@dataclass(frozen=True, slots=True)
class Hit:
    """A keyword match in the normalised text: [start, end) in characters, and the lists holding it."""

    start: int
    end: int
    lists: tuple[int, ...]


class ListError(ValueError):
    """A list that cannot be loaded (the message names the config key)."""


def read_words(data: bytes, where: str) -> list[str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ListError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return [w for line in text.splitlines() if (w := line.strip()) and not w.startswith("#")]


class Keywords:
    """The loaded lists and their automaton; immutable once built (a reload builds a new one)."""

    def __init__(self, lists: list[tuple[str, str, bytes]]) -> None:
        """`lists`: (name, category, file bytes)."""
        self.lists: list[KeywordList] = []
        words: dict[bytes, tuple[int, list[int]]] = {}  # utf-8 of the normalised word -> (chars, lists)
        for i, (name, category, data) in enumerate(lists):
            raw = read_words(data, name)
            for word in raw:
                norm = normalise(word)
                if not norm:
                    continue  # a word made only of separators can never match
                key = norm.encode("utf-8")
                entry = words.setdefault(key, (len(norm), []))
                if not entry[1] or entry[1][-1] != i:
                    entry[1].append(i)
            self.lists.append(KeywordList(name, category, hashlib.sha256(data).hexdigest(), len(raw)))
        self.longest = max((n for n, _ in words.values()), default=0)  # in normalised characters
        self.automaton: Any = None  # ahocorasick_rs.BytesAhoCorasick
        self._meta: list[tuple[int, tuple[int, ...]]] = []  # per pattern: (chars, lists holding it)
        if words:
            import ahocorasick_rs  # here: importing the package stays light (the gateway imports it)

            keys = list(words)
            self._meta = [(n, tuple(holders)) for n, holders in words.values()]
            self.automaton = ahocorasick_rs.BytesAhoCorasick(keys)

    @classmethod
    def from_files(cls, specs: list[tuple[str, str, Path]]) -> Keywords:
        """(name, category, path) -> Keywords; a missing or unreadable file raises ListError naming it."""
        loaded: list[tuple[str, str, bytes]] = []
        for name, category, path in specs:
            try:
                loaded.append((name, category, Path(path).read_bytes()))
            except OSError as exc:
                raise ListError(f"{name}: cannot read {path}: {exc.strerror}") from None
        return cls(loaded)

    def index(self, name: str) -> int:
        for i, kl in enumerate(self.lists):
            if kl.name == name:
                return i
        raise KeyError(name)

    def scan(self, norm: str, wanted: frozenset[int] | None = None) -> list[Hit]:
        """Matches in the normalised text `norm` of the lists `wanted` (None: all)."""
        auto = self.automaton
        if auto is None or not norm:
            return []
        data = norm.encode("utf-8")
        found: list[Hit] = []
        meta = self._meta
        pos_b = pos_c = 0  # byte and character offsets of the last match start (matches sorted by start)
        for pattern, bstart, _ in sorted(auto.find_matches_as_indexes(data, overlapping=True), key=_start):
            nchars, holders = meta[pattern]
            if wanted is not None:
                holders = tuple(h for h in holders if h in wanted)
                if not holders:
                    continue
            pos_c += len(data[pos_b:bstart].decode("utf-8"))  # on a match only
            pos_b = bstart
            found.append(Hit(pos_c, pos_c + nchars, holders))
        return found


def _start(match: tuple[int, int, int]) -> int:
    return match[1]
