"""Server-sent events from an upstream, framed into complete events: a pure parser (bytes in, bytes
out, no I/O), so the framing rules are tested on their own (tests/gateway/test_relay.py) and the relay
(`relay.py`) only moves bytes and watches the clock.

What the relay needs from the events: `[DONE]` (a stream that ends without it failed), the `usage`
object (accounting and token limits), a count of data events (the completion tokens when no usage
comes), and dropping the usage-only chunk the gateway asked for when the client did not.

Framing follows the SSE format where upstreams use it: an event ends at a blank line (LF or CRLF line
ends), `:` lines are comments (relayed, not counted), several `data:` lines are one event whose data
is their values joined by LF. Relayed bytes are the upstream's own, unchanged, unless a usage-only
event is dropped.
"""

from __future__ import annotations

from typing import Any

from xcstack.httputil import loads

DONE = b"data: [DONE]\n\n"


class EventTooLarge(Exception):
    """An event grew past the limit without ending: a broken (or hostile) upstream; buffering it
    further would let one stream hold unbounded memory."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE event over {limit} bytes")
        self.limit = limit


def error_tail(payload: bytes) -> bytes:
    """The end of a stream that failed: one `data:` event with the JSON error, then `[DONE]`."""
    return b"data: " + payload + b"\n\n" + DONE


def last_event_end(buf: bytes) -> int:
    """Where the last complete event in `buf` ends (0: none is complete yet)."""
    i = buf.rfind(b"\n\n")
    j = buf.rfind(b"\r\n\r\n")
    if i < 0 and j < 0:
        return 0
    return max(i + 2 if i >= 0 else 0, j + 4 if j >= 0 else 0)


def split_events(segment: bytes) -> list[bytes]:
    """The events of a segment of complete events, line ends as LF, without their blank line."""
    if b"\r" in segment:
        segment = segment.replace(b"\r\n", b"\n")
    return [part for part in segment.split(b"\n\n") if part and not part.isspace()]


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its `data:` values joined by LF), or None when it has no data field
    (comments only, or only other fields): such an event is not dispatched."""
    if event[:6] == b"data: " and b"\n" not in event:  # the common chunk: one data line
        return event[6:]
    values: list[bytes] | None = None
    for line in event.split(b"\n"):
        if line.startswith(b"data"):
            if line == b"data":
                value = b""
            elif line[4:5] == b":":
                value = line[6:] if line[5:6] == b" " else line[5:]
            else:
                continue  # another field whose name starts with "data"
            if values is None:
                values = [value]
            else:
                values.append(value)
    return None if values is None else b"\n".join(values)


def usage_of(data: bytes) -> tuple[dict[str, Any], bool] | None:
    """(usage, has choices) when the event's JSON carries a usage object (`"usage": null`, as some
    upstreams send in every chunk, is none), else None. Cheap for the common chunk: no JSON parse."""
    if b'"usage":{' not in data and b'"usage": {' not in data:
        return None
    try:
        obj = loads(data)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
        return obj["usage"], bool(obj.get("choices"))
    return None


class EventStream:
    """One upstream stream, fed as chunks arrive: `feed` returns the complete events to relay and
    keeps the incomplete tail (at most `max_event` bytes, else `EventTooLarge`); `end` flushes the
    tail when the upstream closes."""

    __slots__ = ("_buf", "client_usage", "done", "events", "max_event", "usage")

    def __init__(self, max_event: int, client_usage: bool) -> None:
        self.max_event = max_event
        self.client_usage = client_usage  # the client asked for usage itself: its usage chunk is relayed
        self.done = False  # `data: [DONE]` was seen
        self.events = 0  # data events other than [DONE] and a dropped usage-only chunk
        self.usage: dict[str, Any] | None = None
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf + chunk if self._buf else chunk
        cut = last_event_end(buf)
        self._buf = buf[cut:] if cut else buf
        if len(self._buf) > self.max_event:
            self._buf = b""
            raise EventTooLarge(self.max_event)
        return self._process(buf[:cut]) if cut else b""

    def end(self) -> bytes:
        """The upstream closed: an unterminated last event still counts (and is relayed terminated)."""
        tail, self._buf = self._buf, b""
        return self._process(tail + b"\n\n") if tail.strip() else b""

    def _process(self, segment: bytes) -> bytes:
        kept: list[bytes] | None = None  # set once an event is dropped
        events = split_events(segment)
        for n, event in enumerate(events):
            data = event_data(event)
            drop = False
            if data is None:
                pass  # a comment (keep-alive): relayed, not counted
            elif data == b"[DONE]":
                self.done = True
            else:
                self.events += 1
                found = usage_of(data) if b'"usage"' in data else None
                if found is not None:
                    self.usage, has_choices = found
                    if not self.client_usage and not has_choices:  # the chunk only the gateway asked for
                        self.events -= 1
                        drop = True
            if drop and kept is None:
                kept = events[:n]
            elif not drop and kept is not None:
                kept.append(event)
        if kept is None:
            return segment
        return b"".join(event + b"\n\n" for event in kept)
