"""Usage governance through the real app: groups, hard and soft quotas on the gateway, the ledger
record of each call, the usage and quota API and its bad-input codes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.gateway.conftest import MockUpstream
from tests.usage.conftest import governed, login, setup_users

MSG = [{"role": "user", "content": "hi"}]


def chat(gw: Any, h: dict[str, str], **kw: Any) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers=h,
                      json={"model": "mock-model", "messages": MSG, "max_tokens": 4, **kw}, timeout=10)


def ledger(gw: Any) -> list[dict[str, Any]]:
    svc = gw.cap("usage").service

    async def run() -> list[dict[str, Any]]:
        await svc.ledger.flush()
        return await svc.store.fetchall("SELECT * FROM usage_records ORDER BY id")

    return gw.call(run)  # type: ignore[no-any-return]


def test_quotas_groups_ledger_and_api(tmp_path: Path, mock: MockUpstream) -> None:
    gw = governed(tmp_path, mock, {"prices": {"mock-model": {"input": 2.0, "output": 8.0}}})
    try:
        setup_users(gw, {"ops": (["sysadmin"], None), "alice": (["llm-user"], "sales"),
                         "bob": (["llm-user"], "sales"), "carol": (["llm-user"], None)})
        ops, alice, bob, carol = (login(gw, n) for n in ("ops", "alice", "bob", "carol"))
        # groups through the API (sysadmin), audited; a user without the right is refused
        assert httpx.post(gw.url + "/v1/security/groups", headers=ops, json={"name": "rnd"}).status_code == 201
        assert httpx.post(gw.url + "/v1/security/groups", headers=ops, json={"name": "rnd"}).json()["error"][
            "code"] == "group_exists"
        assert httpx.post(gw.url + "/v1/security/groups", headers=alice, json={"name": "x"}).status_code == 403
        r = httpx.put(gw.url + "/v1/security/users/carol/group", headers=ops, json={"group": "nope"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "group_not_found"
        assert httpx.put(gw.url + "/v1/security/users/carol/group", headers=ops,
                         json={"group": "rnd"}).status_code == 200
        groups = {g["name"]: g for g in httpx.get(gw.url + "/v1/security/groups", headers=ops).json()["groups"]}
        assert groups["sales"]["users"] == 2 and groups["rnd"]["users"] == 1
        assert httpx.delete(gw.url + "/v1/security/groups/rnd", headers=ops).json()["error"]["code"] == "group_in_use"

        # bad quota input: stable 400 codes
        def add(body: dict[str, Any], h: dict[str, str] = ops) -> httpx.Response:
            return httpx.post(gw.url + "/v1/quotas", headers=h, json=body)

        base = {"scope": "group", "subject": "sales", "metric": "requests", "period": "day"}
        assert add({**base, "limit": -1}).json()["error"]["code"] == "invalid_quota"
        assert add({**base, "subject": "ghosts", "limit": 1}).json()["error"]["code"] == "unknown_group"
        assert add({**base, "scope": "user", "subject": "nobody", "limit": 1}).json()["error"][
            "code"] == "unknown_subject"
        assert add({**base, "limit": 3}, alice).status_code == 403
        # a hard group quota of 3 requests a day, shared by alice and bob
        qid = add({**base, "limit": 3}).json()["id"]
        assert chat(gw, alice).status_code == 200
        assert chat(gw, bob).status_code == 200
        assert chat(gw, alice, stream=True).status_code == 200
        r = chat(gw, bob)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded" and qid in err["message"] and "resets at" in err["message"]
        assert 0 < int(r.headers["retry-after"]) <= 86400
        assert chat(gw, carol).status_code == 200  # another group
        # the caller's own quota view: limit, used, reset time
        mine = httpx.get(gw.url + "/v1/quotas", headers=alice).json()["quotas"]
        assert [(q["id"], q["used"], q["limit"]) for q in mine] == [(qid, 3.0, 3.0)] and mine[0]["reset_at"]
        assert httpx.get(gw.url + "/v1/quotas?scope=all", headers=alice).status_code == 403
        assert httpx.delete(gw.url + "/v1/quotas/q-none", headers=ops).json()["error"]["code"] == "quota_not_found"
        assert httpx.delete(gw.url + f"/v1/quotas/{qid}", headers=ops).status_code == 200
        assert chat(gw, bob).status_code == 200  # the quota is gone

        # the ledger: one record per call, refusals included, with the group, tokens, cost and price version
        rows = ledger(gw)
        assert [r["status"] for r in rows] == [200, 200, 200, 429, 200, 200]
        first = rows[0]
        usage_svc = gw.cap("usage").service
        assert first["group_name"] == "sales" and first["model"] == "mock-model" and first["upstream"]
        assert first["input_tokens"] > 0 and first["output_tokens"] == 4 and first["estimated"] == 0
        assert first["cost_micro"] == first["input_tokens"] * 2 + first["output_tokens"] * 8
        assert first["price_version"] == usage_svc.prices.version and first["request_id"]
        assert rows[3]["input_tokens"] == 0 and rows[3]["upstream"] == ""
        assert rows[4]["group_name"] == "rnd"

        # the usage API: own usage for everyone, everyone's with usage:read; JSON and CSV
        own = httpx.get(gw.url + "/v1/usage?group_by=model", headers=alice).json()
        assert sum(r["requests"] for r in own["rows"]) == 2 and own["currency"] == "CNY"
        everyone = httpx.get(gw.url + "/v1/usage?scope=all&group_by=group&granularity=hour", headers=ops).json()
        by_group = {r["group"]: r["requests"] for r in everyone["rows"]}
        assert by_group == {"sales": 5, "rnd": 1}
        assert httpx.get(gw.url + "/v1/usage?scope=all", headers=alice).status_code == 403
        csv = httpx.get(gw.url + "/v1/usage?scope=all&group_by=user,model&granularity=month", headers={
            **ops, "Accept": "text/csv"})
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.text.splitlines()[0] == "period,user,model,requests,input_tokens,output_tokens,cost,estimated"
        # bad report input
        for query, code in (("from=yesterday", "invalid_period"), ("from=2024-05-02&to=2024-05-01", "invalid_range"),
                            ("from=2020-01-01&to=2024-01-01&granularity=hour", "range_too_large"),
                            ("scope=all&group=ghosts", "unknown_group"), ("group_by=colour", "invalid_parameter")):
            r = httpx.get(gw.url + "/v1/usage?" + query, headers=ops)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (query, r.text)
    finally:
        gw.stop()


def test_soft_quota_alerts_once_per_threshold_and_stream_cut_short_is_charged(tmp_path: Path,
                                                                              mock: MockUpstream) -> None:
    gw = governed(tmp_path, mock, {"quotas": [
        {"scope": "user", "subject": "dora", "metric": "requests", "period": "month", "limit": 5, "hard": False}]})
    try:
        setup_users(gw, {"dora": (["llm-user"], None)})
        gw.call(gw.cap("usage").service.reload_rules)  # (else within rules_reload_s) the name -> dora's user id
        h = login(gw, "dora")
        for _ in range(7):  # soft: never refused
            assert chat(gw, h).status_code == 200
        from xcstack.usage.quotas import ALERTS

        assert ALERTS.labels("user", "80%")._value.get() >= 1
        audit = gw.cap("security").audit
        alerts = []
        for _ in range(50):
            alerts = [r for r in _records(audit) if r.get("action") == "usage.quota_alert"]
            if len(alerts) >= 2:
                break
            time.sleep(0.05)
        assert sorted(a["detail"]["level"] for a in alerts) == ["100%", "80%"]  # once each, not per call

        # a stream the client leaves is charged what was produced (estimated: the mock sends no usage then)
        mock.configure(tokens=200, tokens_per_s=200.0)
        with httpx.stream("POST", gw.base_url + "/chat/completions", headers=h, timeout=10, json={
                "model": "mock-model", "messages": MSG, "max_tokens": 200, "stream": True}) as resp:
            seen = 0
            for _ in resp.iter_lines():
                seen += 1
                if seen > 10:
                    break
        deadline = time.monotonic() + 5
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = [r for r in ledger(gw) if r["status"] == 499]
            if rows:
                break
            time.sleep(0.05)
        assert rows, "the abandoned stream has its ledger record"
        assert 0 < rows[0]["output_tokens"] < 200
    finally:
        mock.reset()
        gw.stop()


def _records(audit: Any) -> list[dict[str, Any]]:
    from tests.security.conftest import audit_records

    return audit_records(Path(audit.root))  # type: ignore[return-value]
