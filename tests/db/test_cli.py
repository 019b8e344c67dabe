"""`xcstack db check` / `xcstack db queries`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xcstack.db import cli as dbcli


def _config(tmp_path: Path, dsn: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(f"""
data_dir = "{tmp_path}"
[db.databases.main]
driver = "sqlite"
dsn = "{dsn}"
pool_size = 2
[db.databases.main.queries.hello]
sql = "SELECT :who AS who"
params = {{ who = {{ type = "str" }} }}
""")
    return p


def _run(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    sub = parser.add_subparsers(dest="command", required=True)
    dbcli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_check_and_queries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, str(tmp_path / "x.sqlite"))
    assert _run(["--config", str(cfg), "db", "check", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["database"] == "main" and rows[0]["live"] == 2 and rows[0]["ok"]
    assert _run(["--config", str(cfg), "db", "queries", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)[0]
    assert q["endpoint"] == "POST /v1/db/main/hello" and q["params"] == {"who": "str"} and q["read_only"]


def test_check_reports_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, str(tmp_path / "missing" / "dir" / "x.sqlite"))
    assert _run(["--config", str(cfg), "db", "check", "--wait", "1"]) == 1
    assert "DOWN" in capsys.readouterr().out
