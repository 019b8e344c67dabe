"""Policies (selection, strongest action, bad config naming the key) and the evidence record (its
content, and that the matched text is never in it)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError

from xcstack.crypto.recipes import hmac_sm3
from xcstack.safety.blocked import Blocked
from xcstack.safety.engine import ContentSafety
from xcstack.safety.evidence import FINDINGS, Where
from xcstack.safety.hooks import RequestSafety
from xcstack.safety.keywords import Keywords
from xcstack.safety.settings import SafetySettings


def _engine(policies: list[dict[str, Any]]) -> ContentSafety:
    s = SafetySettings.model_validate({"lists": [{"name": "bad", "path": "/dev/null", "category": "abuse"}],
                                       "policies": policies})
    return ContentSafety(s, Keywords([("bad", "abuse", "坏词\n".encode())]))


@pytest.mark.parametrize(("policies", "key"), [
    ([{"name": "p", "input": ["list:nope"]}], "safety.policies[0].input[0]"),
    ([{"name": "p", "output": ["pii", "pii:passport"]}], "safety.policies[0].output[1]"),
    ([{"name": "p", "input": ["regex:x"]}], "safety.policies[0].input[0]"),
    ([{"name": "p", "actions": {"list:zz": "mask"}}], "safety.policies[0].actions.list:zz"),
    ([{"name": "p", "action": "drop"}], "action"),
])
def test_bad_policy_config_names_the_key(policies: list[dict[str, Any]], key: str) -> None:
    with pytest.raises(ValidationError) as exc:
        SafetySettings.model_validate({"lists": [{"name": "bad", "path": "/x", "category": "c"}], "policies": policies})
    assert key in str(exc.value)


def test_missing_list_file_fails_naming_the_key(tmp_path: Any) -> None:
    s = SafetySettings.model_validate({"lists": [{"name": "bad", "path": str(tmp_path / "none.txt"),
                                                  "category": "c"}]})
    with pytest.raises(ValueError, match=r"safety\.lists\[0\]\.path"):
        ContentSafety(s)


def test_policy_selection_and_strongest_action() -> None:
    eng = _engine([
        {"name": "flag-all", "input": ["list:bad", "pii"], "action": "flag"},
        {"name": "grp", "groups": ["public"], "input": ["list:bad"], "action": "block"},
        {"name": "mdl", "models": ["m2"], "routes": ["/v1/completions"], "input": ["pii:mobile"], "action": "mask"},
        {"name": "key", "keys": ["k9"], "output": ["list:bad"], "action": "mask"},
    ])
    p = eng.plan("k1", ("staff",), "m1", "/v1/chat/completions")
    assert p is not None and p.input is not None and p.output is None
    assert p.input.lists["bad"].action == "flag"
    p = eng.plan("k1", ("public",), "m1", "/v1/chat/completions")
    assert p is not None and p.input is not None and p.input.lists["bad"].action == "block"
    p = eng.plan("k1", (), "m2", "/v1/completions")
    assert p is not None and p.input is not None
    assert p.input.pii["mobile"].action == "mask" and p.input.pii["email"].action == "flag"
    p = eng.plan("k9", (), "m1", "/v1/chat/completions")
    assert p is not None and p.output is not None and p.output.lists["bad"].action == "mask"
    assert _engine([{"name": "only", "keys": ["x"], "input": ["pii"]}]).plan("y", (), "m", "/r") is None


def test_evidence_record_has_everything_but_the_text() -> None:
    eng = _engine([{"name": "strict", "input": ["list:bad", "pii:mobile"], "action": "block"}])
    eng.evidence_key = b"k" * 32
    records: list[tuple[str, str, str, dict[str, Any]]] = []

    async def audit(action: str, resource: str, outcome: str, detail: dict[str, Any]) -> None:
        records.append((action, resource, outcome, detail))

    plan = eng.plan("key1", (), "m", "/v1/chat/completions")
    rs = RequestSafety(eng, plan, Where("req-1", "key1", "m", "/v1/chat/completions"), audit, None)
    before = FINDINGS.labels("abuse", "block", "input")._value.get()
    data: dict[str, Any] = {"model": "m", "messages": [{"role": "system", "content": "ok"},
                                       {"role": "user", "content": "说个坏 词, 13800138000"}]}
    with pytest.raises(Blocked) as exc:
        asyncio.run(rs.check_input(data))
    assert exc.value.finding.category == "abuse"
    assert FINDINGS.labels("abuse", "block", "input")._value.get() == before + 1
    (action, resource, outcome, detail), = records
    findings: list[dict[str, Any]] = detail["findings"]
    assert (action, resource, outcome) == ("safety.input", "model:m", "block")
    assert detail["request_id"] == "req-1" and detail["key"] == "key1" and detail["direction"] == "input"
    kw, mob = sorted(findings, key=lambda f: f["detector"])
    assert kw == {"policy": "strict", "detector": "list:bad", "category": "abuse", "action": "block",
                  "start": 2, "end": 5, "field": "messages[1].content", "list_sha256": eng.keywords.lists[0].sha256,
                  "hmac_sm3": hmac_sm3(b"k" * 32, "坏 词".encode()).hex()}
    assert mob["detector"] == "pii:mobile" and mob["hmac_sm3"] == hmac_sm3(b"k" * 32, b"13800138000").hex()
    dumped = json.dumps(records, ensure_ascii=False)
    assert "坏" not in dumped and "13800138000" not in dumped  # the match itself is never stored
    assert data["messages"][1]["content"] == "说个坏 词, 13800138000"  # the caller's body is untouched
