"""Streamed answers: a blocked or masked word split across chunks at every position is caught, the
holdback releases everything else, and the SSE rewrite keeps events intact."""

from __future__ import annotations

import json

import pytest

from tests.safety.conftest import make_engine
from xcstack.safety.engine import Finding
from xcstack.safety.stream import SseFilter, TextFilter

ANSWER = "他说法\u200b轮 功是一个词，电话13800138000，好的。"


def _rules(action: str) -> tuple[object, object]:
    eng = make_engine(action)
    plan = eng.plan("k", (), "m", "/v1/chat/completions")
    assert plan is not None and plan.output is not None
    return eng, plan.output


def _run(action: str, chunks: list[str]) -> tuple[str, list[Finding], Finding | None]:
    eng, rules = _rules(action)
    tf = TextFilter(eng, rules)  # type: ignore[arg-type]
    found: list[Finding] = []
    out = "".join(tf.push(c, found) for c in chunks) + tf.flush(found)
    return out, found, tf.blocked


@pytest.mark.parametrize("action", ["mask", "block"])
def test_word_split_at_every_position(action: str) -> None:
    for i in range(1, len(ANSWER)):
        for j in range(i, len(ANSWER)):
            chunks = [ANSWER[:i], ANSWER[i:j], ANSWER[j:]]
            out, found, blocked = _run(action, chunks)
            if action == "mask":
                assert out == "他说" + "*" * 5 + "是一个词，电话" + "*" * 11 + "，好的。", (i, j)
                assert sorted(f.detector for f in found) == ["list:bad", "pii:mobile"]
                assert [(f.start, f.end) for f in found if f.detector == "list:bad"] == [(2, 7)]
            else:
                assert blocked is not None and blocked.detector == "list:bad", (i, j)
                assert "法" not in out  # nothing of the word was released before the block


def test_one_character_chunks_and_holdback_bound() -> None:
    eng, rules = _rules("mask")
    tf = TextFilter(eng, rules)  # type: ignore[arg-type]
    found: list[Finding] = []
    shown = ""
    for ch in "今天天气很好我们去公园散步":
        shown += tf.push(ch, found)
        # the longest word has 5 normalised characters ("falun"): at most 4 are held back
        assert len(tf.pending) <= 4
    assert shown + tf.flush(found) == "今天天气很好我们去公园散步" and found == []


def _sse(chunks: list[str], finish: bool = True) -> bytes:
    out = [b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
           b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n']
    for c in chunks:
        ev = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
              "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n")
    if finish:
        out.append(b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _text(stream: bytes) -> tuple[str, bool]:
    text = ""
    done = False
    for ev in stream.split(b"\n\n"):
        if not ev:
            continue
        data = ev[6:]
        if data == b"[DONE]":
            done = True
            continue
        for ch in json.loads(data)["choices"]:
            text += (ch.get("delta") or {}).get("content") or ""
    return text, done


@pytest.mark.parametrize("finish", [True, False])
def test_sse_mask_every_split_fed_event_by_event(finish: bool) -> None:
    eng, rules = _rules("mask")
    for i in range(1, len(ANSWER)):
        flt = SseFilter(eng, rules, {"label": "AIGC"})  # type: ignore[arg-type]
        raw = _sse([ANSWER[:i], ANSWER[i:]], finish)
        out = b"".join(flt.feed(ev + b"\n\n") for ev in raw.split(b"\n\n") if ev)
        text, done = _text(out)
        assert text == "他说*****是一个词，电话***********，好的。" and done
        assert b"xc_label" in out.split(b"\n\n")[0]  # the label rides in the first event
        assert len(flt.take()) == 2


def test_sse_block_stops_and_passes_other_events_unchanged() -> None:
    eng, rules = _rules("block")
    flt = SseFilter(eng, rules)  # type: ignore[arg-type]
    first = b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\n'
    assert flt.feed(b": keep-alive\n\n" + first) == b": keep-alive\n\n" + first
    out = flt.feed(_sse(["前文很长很长的一段话", "法輪", "功 后文"]))
    assert flt.blocked is not None and flt.blocked.category == "politics"
    assert "法".encode() not in out and b"[DONE]" not in out
    assert flt.feed(b"data: [DONE]\n\n") == b""
