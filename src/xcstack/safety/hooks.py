"""What the gateway calls for one request (`ContentSafety.begin` -> `RequestSafety`).

- `check_input(data)`: prompts, messages (text parts), embedding inputs, rerank query/documents;
  returns the body to send upstream when something was masked (None: unchanged), raises `Blocked`.
- `answer(payload)`: a non-streamed answer's `choices[].message.content` / `choices[].text`,
  masked or `Blocked`; the label's `xc_label` field added.
- `stream()`: the `SseFilter` for a streamed answer (None: nothing to do), `record(filter)` after
  each relayed batch writes the evidence of what it found.
- `headers`: the label header for the response.
"""

from __future__ import annotations

import asyncio
from typing import Any

from xcstack.httputil import dumps, loads
from xcstack.safety.blocked import Blocked
from xcstack.safety.engine import ContentSafety, Finding, Plan, blocking
from xcstack.safety.evidence import AuditFn, Where, record
from xcstack.safety.label import HEADER, Label
from xcstack.safety.stream import SseFilter


def input_slots(data: dict[str, Any]) -> list[tuple[Any, Any, str]]:
    """(container, key, field name) of every text a request sends to a model."""
    slots: list[tuple[Any, Any, str]] = []
    messages = data.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, str):
                slots.append((m, "content", f"messages[{i}].content"))
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        slots.append((part, "text", f"messages[{i}].content[{j}].text"))
    for name in ("prompt", "input", "query"):
        value = data.get(name)
        if isinstance(value, str):
            slots.append((data, name, name))
        elif isinstance(value, list):
            slots.extend((value, j, f"{name}[{j}]") for j, v in enumerate(value) if isinstance(v, str))
    docs = data.get("documents")
    if isinstance(docs, list):
        for j, d in enumerate(docs):
            if isinstance(d, str):
                slots.append((docs, j, f"documents[{j}]"))
            elif isinstance(d, dict) and isinstance(d.get("text"), str):
                slots.append((d, "text", f"documents[{j}].text"))
    return slots


def answer_slots(obj: Any) -> list[tuple[Any, Any, str]]:
    slots: list[tuple[Any, Any, str]] = []
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if isinstance(choices, list):
        for i, ch in enumerate(choices):
            if not isinstance(ch, dict):
                continue
            msg = ch.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                slots.append((msg, "content", f"choices[{i}].message.content"))
            elif isinstance(ch.get("text"), str):
                slots.append((ch, "text", f"choices[{i}].text"))
    return slots


class RequestSafety:
    def __init__(self, engine: ContentSafety, plan: Plan | None, where: Where, audit: AuditFn | None,
                 label: Label | asyncio.Future[Label] | None, explicit: str | None = None) -> None:
        self.engine = engine
        self.explicit = explicit  # appended to the answer text (the explicit label), or None
        self.plan = plan
        self.where = where
        self.audit = audit
        self._label = label  # a future while its batch is being signed

    async def _label_ready(self) -> None:
        if isinstance(self._label, asyncio.Future):
            self._label = await self._label

    @property
    def label(self) -> Label | None:
        """The label, once signed (`label_ready` or `answer` waited for it)."""
        return self._label if isinstance(self._label, Label) else None

    @property
    def headers(self) -> dict[str, str]:
        return {HEADER: self.label.header} if self.label is not None else {}

    async def _check(self, slots: list[tuple[Any, Any, str]], direction: str) -> bool:
        """Scan and mask the slots in place; True when something was masked; raises Blocked."""
        rules = None if self.plan is None else self.plan.input if direction == "input" else self.plan.output
        if rules is None:
            return False
        found: list[Finding] = []
        masked = False
        pending: list[tuple[Any, Any, str]] = []
        for holder, key, field in slots:
            text = holder[key]
            fs = self.engine.scan(text, rules)
            if not fs:
                continue
            found.extend(_with_field(f, field) for f in fs)
            new = self.engine.apply(text, fs)
            if new != text:
                pending.append((holder, key, new))
        await record(found, direction, self.where, self.audit)
        block = blocking(found)
        if block is not None:
            raise Blocked(block, direction)
        for holder, key, new in pending:
            holder[key] = new
            masked = True
        return masked

    async def label_ready(self) -> None:
        """Wait for the label's batch signature: the relay calls it once the upstream has answered, so
        that the signing overlaps the upstream's time to first token instead of adding to it."""
        await self._label_ready()

    async def check_input(self, data: dict[str, Any]) -> dict[str, Any] | None:
        if self.plan is None or self.plan.input is None:
            return None
        copy = loads(dumps(data))  # masks go into a copy: the caller's parsed body stays as received
        return copy if await self._check(input_slots(copy), "input") else None

    async def answer(self, payload: bytes) -> bytes:
        await self._label_ready()
        if self.label is None and (self.plan is None or self.plan.output is None):
            return payload
        if (self.plan is None or self.plan.output is None) and not self.explicit:
            spliced = _splice_label(payload, self.label)
            if spliced is not None:
                return spliced
        try:
            obj = loads(payload)
        except ValueError:
            return payload
        if not isinstance(obj, dict):
            return payload
        changed = await self._check(answer_slots(obj), "output")
        if self.explicit:  # after the filters: the label text itself is never scanned or masked
            for holder, key, _ in answer_slots(obj):
                holder[key] += self.explicit
                changed = True
        if self.label is not None:
            obj["xc_label"] = self.label.body()
            changed = True
        return dumps(obj) if changed else payload

    def stream(self) -> SseFilter | None:
        rules = self.plan.output if self.plan is not None else None
        if rules is None and self.label is None:
            return None
        return SseFilter(self.engine, rules, self.label.body() if self.label is not None else None, self.explicit)

    async def record(self, flt: SseFilter) -> None:
        """The evidence of a stream's findings so far (call after each batch and at the end)."""
        found = flt.take()
        if found:
            await record(found, "output", self.where, self.audit)


def _splice_label(payload: bytes, label: Label | None) -> bytes | None:
    """`payload` (a JSON object) with `xc_label` as its first member, without parsing it (None: not
    a plain JSON object, or one that has an `xc_label` already)."""
    if label is None:
        return None
    body = payload.lstrip()
    if not body.startswith(b"{") or b'"xc_label"' in body:
        return None
    rest = body[1:].lstrip()
    sep = b"" if rest.startswith(b"}") else b","
    return b'{"xc_label":' + dumps(label.body()) + sep + rest


def _with_field(f: Finding, field: str) -> Finding:
    import dataclasses

    return dataclasses.replace(f, field=field)
