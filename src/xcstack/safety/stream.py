"""Output filtering of a streamed answer, as it flows.

`TextFilter` is one choice's text: each chunk is appended to what is held, scanned, and released
except for a tail that could still be the start of a match: the last `longest keyword - 1`
normalised characters (separators between them ride along, so `法` `\u200b` `轮` split anywhere is
still one word) and, when personal-information detectors run, a trailing run of token characters
(digits, letters, `.@:+-`, at most 64). A match wholly released is masked (or blocks) before the
client sees any of it; the added delay is at most the holdback.

`SseFilter` applies it to an OpenAI SSE stream: for each complete event (the relay hands over whole
events) it rewrites `choices[].delta.content` (chat) or `choices[].text` (completions) with the
released text; a choice's `finish_reason`, `[DONE]`, or the end of the stream flush what is held.
Events without content (role, usage, comments) pass through byte for byte.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xcstack.httputil import dumps, loads
from xcstack.safety.engine import ContentSafety, Finding, Rules, blocking
from xcstack.safety.normalise import tables

PII_TAIL_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.@:+-_% ")
PII_TAIL_MAX = 64
DONE = b"data: [DONE]"


class TextFilter:
    __slots__ = ("blocked", "emitted", "engine", "hold", "pending", "rules")

    def __init__(self, engine: ContentSafety, rules: Rules) -> None:
        self.engine = engine
        self.rules = rules
        self.hold = engine.holdback(rules)
        self.pending = ""
        self.emitted = 0  # original characters released so far: offsets in records are from the start
        self.blocked: Finding | None = None

    def push(self, text: str, findings: list[Finding]) -> str:
        """Add a chunk; returns the text the client may see now (findings appended to `findings`)."""
        self.pending += text
        return self._release(False, findings)

    def flush(self, findings: list[Finding]) -> str:
        return self._release(True, findings)

    def _cut(self) -> int:
        p = self.pending
        cut = len(p)
        if self.hold:
            table = tables()[0]
            need = self.hold
            i = len(p)
            while i > 0 and need:
                i -= 1
                if table.get(ord(p[i]), 0) is not None:
                    need -= 1
            cut = i if need == 0 else 0
        if self.rules.pii:
            j = len(p)
            stop = max(0, len(p) - PII_TAIL_MAX)
            while j > stop and p[j - 1] in PII_TAIL_CHARS:
                j -= 1
            cut = min(cut, j)
        return cut

    def _release(self, final: bool, findings: list[Finding]) -> str:
        p = self.pending
        if not p or self.blocked is not None:
            return ""
        cut = len(p) if final else self._cut()
        found = self.engine.scan(p, self.rules)
        kept: list[Finding] = []
        changed = True
        while changed:  # a match that starts before the cut is released whole (masked) with it
            changed = False
            for f in found:
                if f.start < cut < f.end:
                    cut = f.end
                    changed = True
        kept = [f for f in found if f.start < cut]
        if not cut:
            return ""
        out = self.engine.apply(p[:cut], kept)
        base = self.emitted
        findings.extend(dataclasses.replace(f, start=f.start + base, end=f.end + base) for f in kept)
        block = blocking(kept)
        if block is not None:
            self.blocked = block
            self.pending = ""
            return ""
        self.pending = p[cut:]
        self.emitted += cut
        return out


class SseFilter:
    """One streamed answer: `feed(segment of complete events) -> bytes to relay`; `end()` at the end
    of the upstream stream. After a block, `blocked` is set and nothing more is released."""

    def __init__(self, engine: ContentSafety, rules: Rules | None, label: dict[str, Any] | None = None,
                 explicit: str | None = None) -> None:
        self.engine = engine
        self.explicit = explicit  # the explicit label: a last delta of each choice, before its finish
        self._explicit_done: set[int] = set()
        self.rules = rules
        self.label = label  # put into the first event with choices (`xc_label`), then None
        self.choices: dict[int, TextFilter] = {}
        self.findings: list[Finding] = []  # not yet recorded: the caller takes them (`take`)
        self.blocked: Finding | None = None
        self._template: dict[str, Any] | None = None  # id/object/created/model of the last content event
        self._field = "content"

    def take(self) -> list[Finding]:
        out, self.findings = self.findings, []
        return out

    def _choice(self, index: int) -> TextFilter:
        tf = self.choices.get(index)
        if tf is None:
            assert self.rules is not None
            tf = self.choices[index] = TextFilter(self.engine, self.rules)
        return tf

    def feed(self, segment: bytes) -> bytes:
        if self.blocked is not None or not segment:
            return b""
        if b"\r" in segment:
            segment = segment.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        for event in segment.split(b"\n\n"):
            if not event or event.isspace():
                continue
            if event.startswith(DONE) and event.strip() == DONE:
                tail = self._flush_all()
                if self.blocked is not None:
                    break
                if tail:
                    out.append(tail)
                out.append(event + b"\n\n")
                continue
            new = self._event(event)
            if self.blocked is not None:
                break
            if new:
                out.append(new + b"\n\n")
        return b"".join(out)

    def end(self) -> bytes:
        """The upstream stream ended (without `[DONE]`): release what is held."""
        if self.blocked is not None:
            return b""
        return self._flush_all()

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:") or b"\ndata" in event:
            return event  # a comment, another field, or a multi-line event: relayed as it is
        raw = event[5:].lstrip(b" ")
        if b'"choices"' not in raw:
            return event
        try:
            obj = loads(raw)
        except ValueError:
            return event
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            return event
        changed = False
        if self.label is not None:
            obj["xc_label"], self.label = self.label, None
            changed = True
        if self.rules is not None:
            filtered = self._filter(choices)
            if filtered is None:
                return b""
            changed = changed or filtered
        if self.explicit and self._append_explicit(choices):
            changed = True
        if self._template is None:
            self._template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        return b"data: " + dumps(obj) if changed else event

    def _append_explicit(self, choices: list[Any]) -> bool:
        changed = False
        for ch in choices:
            if not isinstance(ch, dict) or ch.get("finish_reason") is None:
                continue
            idx = ch.get("index", 0)
            index = idx if isinstance(idx, int) else 0
            if index in self._explicit_done:
                continue
            self._explicit_done.add(index)
            delta = ch.get("delta")
            if isinstance(delta, dict):
                delta["content"] = (delta.get("content") or "") + str(self.explicit)
            else:
                ch["text"] = (ch.get("text") or "") + str(self.explicit)
            changed = True
        return changed

    def _filter(self, choices: list[Any]) -> bool | None:
        """Filter the choices' text in place: changed or not; None: blocked (the event is dropped)."""
        changed = False
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            index = idx if isinstance(idx, int) else 0
            holder, field = _content_slot(ch)
            if holder is None:
                if ch.get("finish_reason") is not None and index in self.choices:
                    rest = self._choice(index).flush(self.findings)
                    if self._stop_on_block():
                        return None
                    if rest:
                        if isinstance(ch.get("delta"), dict):
                            ch["delta"]["content"] = rest
                        else:
                            ch["text"] = rest
                        changed = True
                continue
            self._field = field
            text = holder[field]
            tf = self._choice(index)
            shown = tf.push(text, self.findings)
            if ch.get("finish_reason") is not None:
                shown += tf.flush(self.findings)
            if self._stop_on_block():
                return None
            if shown != text:
                holder[field] = shown
                changed = True
        return changed

    def _stop_on_block(self) -> bool:
        for tf in self.choices.values():
            if tf.blocked is not None:
                self.blocked = tf.blocked
                return True
        return False

    def _flush_all(self) -> bytes:
        """Held text of every choice as one extra event (before `[DONE]`)."""
        items: list[dict[str, Any]] = []
        for index, tf in sorted(self.choices.items()):
            rest = tf.flush(self.findings)
            if self._stop_on_block():
                return b""
            if rest:
                if self._field == "text":
                    items.append({"index": index, "text": rest, "finish_reason": None})
                else:
                    items.append({"index": index, "delta": {"content": rest}, "finish_reason": None})
        if not items:
            return b""
        obj = {**(self._template or {}), "choices": items}
        return b"data: " + dumps(obj) + b"\n\n"


def _content_slot(choice: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    delta = choice.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
        return delta, "content"
    if isinstance(choice.get("text"), str):
        return choice, "text"
    return None, "content"
