"""Keyword lists matched with Aho-Corasick (pyahocorasick), after normalisation (`normalise.py`).

A list is a UTF-8 file, one word a line (`#` starts a comment line, blank lines are skipped); it is
identified by the sha256 of its bytes, which every record it causes carries. All lists go into one
automaton; each word remembers which lists hold it.

pyahocorasick walks `str` keys one code point at a time, and a node with thousands of children (the
root of a Chinese list: every first character) is searched slowly: ~0.5 MB/s for 10,000 Chinese words.
So words and text are both fed as their UTF-8 bytes seen as latin-1 characters (at most 256 children a
node): ~50 MB/s. Byte offsets are turned back into character offsets only for a match.
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
        self.automaton: Any = None  # ahocorasick.Automaton
        if words:
            import ahocorasick  # here: importing the package stays light (the gateway imports it)

            auto = ahocorasick.Automaton()
            for key, (_, holders) in words.items():
                auto.add_word(key.decode("latin-1"), (len(key), tuple(holders)))
            auto.make_automaton()
            self.automaton = auto

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
        prefix_bytes = 0
        prefix_chars = 0
        for end, (blen, holders) in auto.iter(data.decode("latin-1")):
            if wanted is not None:
                holders = tuple(h for h in holders if h in wanted)
                if not holders:
                    continue
            bstart = end + 1 - blen
            # characters before bstart, counted from the last hit's start (hits come in end order)
            if bstart >= prefix_bytes:
                prefix_chars += len(data[prefix_bytes:bstart].decode("utf-8"))
            else:
                prefix_chars -= len(data[bstart:prefix_bytes].decode("utf-8"))
            prefix_bytes = bstart
            nchars = len(data[bstart:end + 1].decode("utf-8"))
            found.append(Hit(prefix_chars, prefix_chars + nchars, holders))
        return found
