"""Evidence through the real security capability: a blocked or masked request (chat, embeddings,
rerank) writes its record into the SM3 audit chain in a tmp data dir; the chain verifies; no segment
holds the matched text. And the input policies of embeddings and rerank bodies (every shape the local
and upstream paths receive)."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, make_settings, upstream
from tests.safety.conftest import make_engine
from xcstack.safety.blocked import Blocked
from xcstack.safety.evidence import Where
from xcstack.safety.hooks import RequestSafety
from xcstack.safety.settings import SafetySettings

PW = "Safety-Pass-2024!"
WORD = "敏感词甲"


def _audit_bytes(root: Path) -> bytes:
    out = b""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out += gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
    return out


def test_blocked_and_masked_requests_leave_verifiable_records_without_the_text(tmp_path: Path,
                                                                              mock: MockUpstream) -> None:
    from xcstack.security.audit.verify import verify_chain
    from xcstack.security.service import SYSTEM
    from xcstack.security.settings import SecuritySettings

    lst = tmp_path / "list.txt"
    lst.write_text(WORD + "\n", encoding="utf-8")
    settings = make_settings(tmp_path, [upstream(mock, models=["mock-model", "mock-rerank"])])
    settings.security = SecuritySettings.model_validate({"pbkdf2_iterations": 100_000})
    settings.safety = SafetySettings.model_validate({
        "lists": [{"name": "bad", "path": str(lst), "category": "abuse"}], "label": {"enabled": False},
        "policies": [{"name": "strict", "input": ["list:bad", "pii:mobile"], "action": "block",
                      "actions": {"pii:mobile": "mask"}}]})
    gw = GatewayServer(settings, ["xcstack.security.capability", "xcstack.safety.capability", GATEWAY_CAP]).start()
    try:
        svc = gw.cap("security").service

        async def setup() -> None:
            await svc.create_role(SYSTEM, "llm-user", [("route:/v1/*", "*"), ("model:*", "invoke")])
            await svc.create_user(SYSTEM, "app", ["llm-user"], kind="service", password=PW)

        gw.call(setup)
        token = httpx.post(gw.url + "/v1/auth/login", json={"username": "app", "password": PW}).json()["token"]
        h = {"Authorization": f"Bearer {token}"}

        def post(path: str, body: dict[str, Any]) -> httpx.Response:
            return httpx.post(gw.base_url + path, headers=h, json=body, timeout=30)

        r = post("/chat/completions", {"model": "mock-model", "max_tokens": 2,
                                       "messages": [{"role": "user", "content": f"说说{WORD[:2]} {WORD[2:]}"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked" and WORD[:2] not in r.text
        r = post("/embeddings", {"model": "mock-model", "input": ["ok", f"x{WORD}"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
        r = post("/rerank", {"model": "mock-rerank", "query": "q", "documents": ["a", {"text": WORD}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents[1]"  # prepare flattens {text}
        r = post("/rerank", {"model": "mock-rerank", "query": "call 13800138000", "documents": ["a", "b"]})
        assert r.status_code == 200, r.text
        assert mock.last()["body"]["query"] == "call ***********"  # masked before it went upstream

        sec = gw.cap("security")
        report = gw.call(lambda: verify_chain(sec.audit.dir))
        assert report.ok, report.problem
        raw = _audit_bytes(sec.audit_root)
        lines = [json.loads(x) for x in raw.splitlines() if b'"safety.input"' in x]
        records = [x for x in lines if x.get("action") == "safety.input"]
        assert [x["outcome"] for x in records] == ["block", "block", "block", "mask"], records
        fields = [f["field"] for x in records for f in x["detail"]["findings"]]
        assert fields == ["messages[0].content", "input[1]", "documents[1]", "query"]
        assert all(len(f["hmac_sm3"]) == 64 for x in records for f in x["detail"]["findings"])
        for secret in (WORD, WORD[:2], WORD[2:], "13800138000"):  # never stored, in any file of the log
            assert secret.encode() not in raw
    finally:
        gw.stop()


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "e", "input": "一个敏感词甲"}, "input"),
    ({"model": "e", "input": ["ok", "敏感词甲"]}, "input[1]"),
    ({"model": "r", "query": "敏感词甲", "documents": ["a"]}, "query"),
    ({"model": "r", "query": "q", "documents": ["a", "敏感词甲"]}, "documents[1]"),
    ({"model": "r", "query": "q", "documents": [{"text": "a"}, {"text": "敏感词甲"}]}, "documents[1].text"),
])
def test_embedding_and_rerank_inputs_are_checked(body: dict[str, Any], field: str) -> None:
    eng = make_engine("block", words="敏感词甲\n")
    rs = RequestSafety(eng, eng.plan("k", (), "m", "/v1/embeddings"), Where("r", "k", "m", "/v1/embeddings"),
                       None, None)
    with pytest.raises(Blocked) as exc:
        asyncio.run(rs.check_input(body))
    assert exc.value.finding.field == field
    masking = make_engine("mask", words="敏感词甲\n")
    rs = RequestSafety(masking, masking.plan("k", (), "m", "/v1/rerank"), Where("r", "k", "m", "/v1/rerank"),
                       None, None)
    out = asyncio.run(rs.check_input(body))
    assert out is not None and "敏感词甲" not in json.dumps(out, ensure_ascii=False)
    assert "敏感词甲" in json.dumps(body, ensure_ascii=False)  # the caller's body is untouched
