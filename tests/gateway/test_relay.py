"""The SSE event parser the streaming relay uses (`gateway/sse.py`), on its own: bytes in, bytes out.

Framing (events split anywhere across chunks, LF and CRLF, comments, multi-line data), the oversized
event limit, `[DONE]`, usage and the event count the relay falls back on when no usage comes.
"""

from __future__ import annotations

import json

import pytest

from xcstack.gateway.sse import DONE, EventStream, EventTooLarge, error_tail, event_data, last_event_end

LIMIT = 1024


def _chunk(content: str, usage: dict[str, int] | None = None, choices: bool = True) -> bytes:
    obj: dict[str, object] = {"object": "chat.completion.chunk",
                              "choices": [{"index": 0, "delta": {"content": content}}] if choices else []}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _feed_all(stream: EventStream, chunks: list[bytes]) -> bytes:
    return b"".join(stream.feed(c) for c in chunks) + stream.end()


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
STREAM = _chunk("Hel") + _chunk("lo") + _chunk("", USAGE, choices=False) + DONE


def test_events_split_at_every_byte_come_out_whole_and_in_order() -> None:
    whole = EventStream(LIMIT, client_usage=True)
    assert whole.feed(STREAM) == STREAM
    split = EventStream(LIMIT, client_usage=True)
    outs = [split.feed(STREAM[i:i + 1]) for i in range(len(STREAM))]
    assert b"".join(outs) == STREAM
    # nothing is released before its blank line: each non-empty output ends an event
    assert all(out.endswith(b"\n\n") for out in outs if out)
    assert [out for out in outs if out] == [_chunk("Hel"), _chunk("lo"), _chunk("", USAGE, choices=False), DONE]
    for s in (whole, split):
        assert s.done and s.events == 3 and s.usage == USAGE


def test_crlf_and_lf_line_ends_frame_alike_and_are_relayed_unchanged() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    s = EventStream(LIMIT, client_usage=True)
    # split inside the CRLF CRLF that ends the first event: it is complete only with its last LF
    first_end = crlf.index(b"\r\n\r\n") + 4
    assert s.feed(crlf[:first_end - 1]) == b""
    assert s.feed(crlf[first_end - 1:]) == crlf
    assert s.done and s.events == 3 and s.usage == USAGE
    mixed = _chunk("a").replace(b"\n", b"\r\n") + _chunk("b") + DONE.replace(b"\n", b"\r\n")
    m = EventStream(LIMIT, client_usage=False)
    assert _feed_all(m, [mixed[:7], mixed[7:40], mixed[40:]]) == mixed
    assert m.done and m.events == 2
    assert last_event_end(b"data: x\r\n\r\ndata: y\n\ndata: z") == len(b"data: x\r\n\r\ndata: y\n\n")


def test_comments_are_relayed_but_not_counted() -> None:
    s = EventStream(LIMIT, client_usage=False)
    stream = b": keep-alive\n\n" + b": note\n" + _chunk("x") + b":ping\r\n\r\n" + DONE
    assert _feed_all(s, [stream]) == stream
    assert s.events == 1 and s.done
    assert event_data(b": only a comment") is None
    assert event_data(b"event: ping\nid: 7") is None  # no data field: not dispatched


def test_multi_line_data_is_one_event_with_its_lines_joined() -> None:
    assert event_data(b"data: {\"a\":\ndata:1}\n: c\ndata") == b'{"a":\n1}\n'
    assert event_data(b"data:no-space") == b"no-space"
    assert event_data(b"data:  two spaces") == b" two spaces"  # only one leading space is dropped
    assert event_data(b"datafield: not data") is None
    usage = json.dumps({"usage": USAGE}, separators=(",", ":")).encode()
    event = b'data: {"choices":[],\ndata: ' + usage[1:] + b"\n\n"
    s = EventStream(LIMIT, client_usage=False)
    # one event however many data lines: counted once, and its usage (spread over lines) is found;
    # being usage-only and not asked for by the client, it is dropped
    assert _feed_all(s, [_chunk("x"), event, DONE]) == _chunk("x") + DONE
    assert s.events == 1 and s.usage == USAGE and s.done


def test_an_event_over_the_limit_is_refused_without_buffering_more() -> None:
    exact = EventStream(LIMIT, client_usage=False)
    assert exact.feed(b"x" * LIMIT) == b""  # at the limit: still waiting for its end
    assert exact.feed(b"\n\n") == b"x" * LIMIT + b"\n\n"
    over = EventStream(LIMIT, client_usage=False)
    with pytest.raises(EventTooLarge) as info:
        for _ in range(LIMIT):
            over.feed(b"xx")
    assert info.value.limit == LIMIT
    # the incomplete tail after complete events counts too
    tail = EventStream(LIMIT, client_usage=False)
    with pytest.raises(EventTooLarge):
        tail.feed(_chunk("ok") + b"data: " + b"y" * LIMIT)


def test_done_ends_the_stream_only_as_its_own_event() -> None:
    s = EventStream(LIMIT, client_usage=False)
    text = _chunk("data: [DONE]")  # the text in content is not the end of the stream
    assert s.feed(text) == text and not s.done and s.events == 1
    assert s.feed(b"data:[DONE]\n\n") == b"data:[DONE]\n\n"
    assert s.done and s.events == 1


def test_usage_chunk_dropped_only_when_the_gateway_asked_for_it() -> None:
    asked_by_gateway = EventStream(LIMIT, client_usage=False)
    assert asked_by_gateway.feed(STREAM) == _chunk("Hel") + _chunk("lo") + DONE
    assert asked_by_gateway.usage == USAGE and asked_by_gateway.events == 2
    with_choices = EventStream(LIMIT, client_usage=False)  # usage riding on a content chunk stays
    last = _chunk("!", USAGE)
    assert with_choices.feed(last + DONE) == last + DONE and with_choices.usage == USAGE
    null = EventStream(LIMIT, client_usage=False)  # "usage": null in every chunk is no usage
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
    assert null.feed(chunk) == chunk and null.usage is None and null.events == 1


def test_end_flushes_an_unterminated_last_event() -> None:
    s = EventStream(LIMIT, client_usage=False)
    assert s.feed(_chunk("a") + b"data: [DONE]") == _chunk("a")
    assert not s.done
    assert s.end() == b"data: [DONE]\n\n" and s.done
    blank = EventStream(LIMIT, client_usage=False)
    assert blank.feed(_chunk("a") + b" \r\n ") == _chunk("a")
    assert blank.end() == b"" and blank.events == 1 and not blank.done


def test_error_tail_is_an_error_event_then_done() -> None:
    assert error_tail(b'{"error":{}}') == b'data: {"error":{}}\n\n' + DONE
