"""Quotas from the config file that name a user or group created after the server started apply to
that subject's first call, not only after `rules_reload_s` (set to an hour here, so a reload cannot be
what makes them apply)."""

from __future__ import annotations

from pathlib import Path

from tests.gateway.conftest import MockUpstream
from tests.usage.conftest import governed, login, setup_users
from tests.usage.test_gateway_usage import chat


def test_config_quota_for_a_user_created_after_start_applies_at_once(tmp_path: Path, mock: MockUpstream) -> None:
    quotas = [{"scope": "user", "subject": "late", "metric": "requests", "period": "day", "limit": 1},
              {"scope": "group", "subject": "newdept", "metric": "requests", "period": "day", "limit": 2}]
    gw = governed(tmp_path, mock, {"quotas": quotas, "rules_reload_s": 3600})
    try:
        setup_users(gw, {"early": (["llm-user"], None)})
        early = login(gw, "early")
        assert chat(gw, early).status_code == 200  # a call before the user exists: its rules are cached
        # created after start (through the security service, as the API and CLI create them)
        setup_users(gw, {"late": (["llm-user"], None), "dept1": (["llm-user"], "newdept"),
                         "dept2": (["llm-user"], "newdept")})
        late = login(gw, "late")
        assert chat(gw, late).status_code == 200
        r = chat(gw, late)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded" and "config-1" in \
            r.json()["error"]["message"]
        d1, d2 = login(gw, "dept1"), login(gw, "dept2")
        assert chat(gw, d1).status_code == 200 and chat(gw, d2).status_code == 200
        assert chat(gw, d1).status_code == 429  # the group's config quota, shared
        assert chat(gw, early).status_code == 200  # not limited
    finally:
        gw.stop()
