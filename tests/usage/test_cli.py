"""`xcstack group ...`, `xcstack user group`, `xcstack user key group`, `xcstack quota ...`: the API's
checks and codes, the state they leave, and the audit records (actor `cli:<os user>`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.security.conftest import audit_records
from xcstack.security import cli as sec_cli
from xcstack.usage import cli as usage_cli

CONFIG = """
data_dir = "{data}"
[crypto]
access = "direct"
[security]
pbkdf2_iterations = 100000
[[usage.quotas]]
scope = "user"
subject = "*"
metric = "cost"
period = "day"
limit = 20.0
hard = false
"""

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def xc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    cfg = tmp_path / "xc.toml"
    cfg.write_text(CONFIG.format(data=tmp_path / "data"))
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(cfg))
    sub = p.add_subparsers(dest="command", required=True)
    sec_cli.register(sub)
    usage_cli.register(sub)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        args = p.parse_args(list(argv))
        rc = int(args.func(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def fails(res: tuple[int, str, str], code: str) -> bool:
    rc, _, err = res
    return rc == 1 and f"({code})" in err


def test_group_commands(xc: Run, tmp_path: Path) -> None:
    assert xc("group", "create", "sales", "--description", "销售部")[0] == 0
    assert fails(xc("group", "create", "sales"), "group_exists")
    assert fails(xc("group", "create", "bad name!"), "invalid_parameter")  # GroupCreate's pattern, as the API
    assert fails(xc("group", "create", "x", "--description", "d" * 300), "invalid_parameter")
    assert xc("user", "create", "alice", "--role", "sysadmin", "--kind", "service")[0] == 0
    rc, out, _ = xc("user", "key", "create", "alice", "--role", "sysadmin")
    kid = out.split()[2]
    assert rc == 0 and kid
    # users
    assert xc("user", "group", "alice", "sales")[0] == 0
    assert fails(xc("user", "group", "alice", "ghosts"), "group_not_found")
    assert fails(xc("user", "group", "nobody", "sales"), "user_not_found")
    assert fails(xc("user", "group", "alice"), "invalid_parameter")  # neither GROUP nor --none
    assert fails(xc("user", "group", "alice", "sales", "--none"), "invalid_parameter")  # both
    # keys
    assert xc("user", "key", "group", kid, "sales")[0] == 0
    assert fails(xc("user", "key", "group", "nope", "sales"), "apikey_not_found")
    assert fails(xc("user", "key", "group", kid, "ghosts"), "group_not_found")
    rc, out, _ = xc("group", "list", "--json")
    (g,) = json.loads(out)
    assert rc == 0 and (g["name"], g["description"], g["users"], g["keys"]) == ("sales", "销售部", 1, 1)
    assert fails(xc("group", "delete", "sales"), "group_in_use")
    assert xc("user", "group", "alice", "--none")[0] == 0
    assert xc("user", "key", "group", kid, "--none")[0] == 0
    assert "users 0" in xc("group", "list")[1]
    assert xc("group", "delete", "sales")[0] == 0
    assert fails(xc("group", "delete", "sales"), "group_not_found")
    # audited like the API, naming the operator
    recs = [r for r in audit_records(tmp_path / "data" / "audit") if str(r["action"]).startswith("group.")]
    seen = {(r["action"], r["resource"], r["outcome"]) for r in recs}
    assert {("group.create", "group:sales", "success"), ("group.create", "group:sales", "failure"),
            ("group.assign", "user:alice", "success"), ("group.assign", f"apikey:{kid}", "success"),
            ("group.assign", "user:alice", "failure"), ("group.delete", "group:sales", "failure"),
            ("group.delete", "group:sales", "success")} <= seen, seen
    assert all(str(r["actor"]).startswith("cli:") for r in recs)


def test_quota_commands(xc: Run, tmp_path: Path) -> None:
    assert xc("group", "create", "sales")[0] == 0
    assert xc("user", "create", "bob", "--role", "sysadmin", "--kind", "service")[0] == 0
    rc, out, _ = xc("quota", "set", "group", "sales", "requests", "day", "3")
    assert rc == 0 and "added" in out
    qid = out.split()[1]
    rc, out, _ = xc("quota", "set", "group", "sales", "requests", "day", "5")  # the same quota: its limit changes
    assert rc == 0 and f"quota {qid}: limit 3 -> 5" in out
    assert xc("quota", "set", "user", "bob", "total_tokens", "month", "1e6", "--soft")[0] == 0
    # the API's checks and codes
    assert fails(xc("quota", "set", "group", "sales", "requests", "day", "-1"), "invalid_quota")
    assert fails(xc("quota", "set", "group", "ghosts", "requests", "day", "1"), "unknown_group")
    assert fails(xc("quota", "set", "user", "nobody", "requests", "day", "1"), "unknown_subject")
    assert fails(xc("quota", "set", "team", "sales", "requests", "day", "1"), "invalid_parameter")
    assert fails(xc("quota", "set", "group", "sales", "words", "day", "1"), "invalid_parameter")
    assert fails(xc("quota", "set", "group", "sales", "requests", "week", "1"), "invalid_parameter")
    assert fails(xc("quota", "set", "group", "sales", "requests", "day", "lots"), "invalid_parameter")
    rc, out, _ = xc("quota", "list", "--json")
    listed = json.loads(out)
    assert rc == 0 and listed["timezone"] == "Asia/Shanghai"
    rows = {(q["source"], q["scope"], q["subject"], q["metric"], q["limit"], q["hard"]) for q in listed["quotas"]}
    assert rows == {("config", "user", "*", "cost", 20.0, False), ("api", "group", "sales", "requests", 5.0, True),
                    ("api", "user", "bob", "total_tokens", 1e6, False)}
    assert qid in xc("quota", "list")[1]
    assert fails(xc("quota", "delete", "config-1"), "quota_not_found")  # config quotas are changed there
    assert xc("quota", "delete", qid)[0] == 0
    assert fails(xc("quota", "delete", qid), "quota_not_found")
    assert qid not in xc("quota", "list")[1]
    recs = [r for r in audit_records(tmp_path / "data" / "audit") if str(r["action"]).startswith("usage.quota")]
    seen = [(r["action"], r["outcome"]) for r in recs]
    assert seen.count(("usage.quota_create", "success")) == 2 and ("usage.quota_update", "success") in seen
    assert seen.count(("usage.quota_create", "failure")) == 7
    assert ("usage.quota_delete", "success") in seen and seen.count(("usage.quota_delete", "failure")) == 2
    upd = next(r for r in recs if r["action"] == "usage.quota_update")
    assert upd["resource"] == f"quota:{qid}" and upd["detail"]["old_limit"] == 3.0  # type: ignore[index]
    assert all(str(r["actor"]).startswith("cli:") for r in recs)
