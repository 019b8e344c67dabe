"""Bad db config fails at start-up with the key and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xcstack.config import ConfigError, load_settings
from xcstack.db.bridge import Bridge
from xcstack.db.settings import DbSettings


def _load(tmp_path: Path, toml: str) -> Any:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    return load_settings(p)


def test_good_config_loads(tmp_path: Path) -> None:
    s = _load(tmp_path, """
[db.databases.main]
driver = "postgres"
dsn = "host=127.0.0.1 dbname=x"
[db.databases.main.queries.item]
sql = "SELECT * FROM t WHERE id = :id"
params = { id = { type = "int", min = 1 } }
""")
    q = s.db.databases["main"].queries["item"]
    assert q.is_read_only() and q.params["id"].min == 1
    assert "dbname=x" not in str(s.model_dump(mode="json"))  # the DSN is a secret


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[db.databases.m]\ndriver = "oracle"\ndsn="x"', "db.databases.m.driver", "Input should be"),
        ('[db.databases.m]\ndriver = "postgres"', "db.databases.m", "needs dsn or shards"),
        ('[db.databases.m]\ndsn = "x"\npool_size = 0', "db.databases.m.pool_size", "greater than or equal"),
        ('[db.databases.m]\ndsn = "x"\nbogus = 1', "db.databases.m.bogus", "unknown key"),
        ('[db.databases.m.queries.q]\nsql = "x"\nstatements = ["y"]', "db.databases.m.queries.q", "exactly one"),
        ('[db.databases.m.queries.q]\nsql = "x"\nparams = { a = { type = "str", min = 1 } }',
         "db.databases.m.queries.q.params.a", "min/max apply to numbers"),
        ('[db.databases.m.queries.q]\nsql = "x"\nparams = { a = { type = "int", min = 5, max = 1 } }',
         "db.databases.m.queries.q.params.a", "min is greater than max"),
        ('[db.databases.m.queries.q]\nsql = "x"\nparams = { a = { pattern = "(" } }',
         "db.databases.m.queries.q.params.a.pattern", "invalid regular expression"),
        ('[db.databases.m]\ndriver="mysql"\nshards = ["mysql://a/x", "mysql://b/x"]\n'
         '[db.databases.m.queries.q]\nsql = "x"', "db.databases.m", "needs shard_key"),
        ('[db.databases.m.queries.q]\nsql = "x"\nshard_key = "k"', "db.databases.m.queries.q", "not one of"),
        ('[db.databases.m.queries.q]\nsql = "DELETE FROM t"\nfan_out = true', "db.databases.m.queries.q",
         "must be read-only"),
        ('[db.databases."bad name"]\ndsn = "x"', "db.databases", "database name"),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, toml)
    text = str(ei.value)
    assert key in text and reason in text, text


def test_undeclared_placeholder_fails_at_bridge_build() -> None:
    s = DbSettings.model_validate(
        {"databases": {"m": {"queries": {"q": {"sql": "SELECT :a, :b", "params": {"a": {"type": "int"}}}}}}}
    )
    with pytest.raises(ValueError, match=r"db.databases.m.queries.q: placeholder\(s\) \['b'\]"):
        Bridge(s)


def test_bad_default_fails_at_bridge_build() -> None:
    s = DbSettings.model_validate({"databases": {"m": {"queries": {"q": {
        "sql": "SELECT :a", "params": {"a": {"type": "int", "required": False, "default": "x"}}}}}}})
    with pytest.raises(ValueError, match="default of parameter 'a'"):
        Bridge(s)


def test_read_only_detection() -> None:
    from xcstack.db.settings import QuerySettings

    assert QuerySettings(sql="SELECT 1").is_read_only()
    assert QuerySettings(sql="  with x as (select 1) select * from x").is_read_only()
    assert not QuerySettings(sql="SELECT * FROM t FOR UPDATE").is_read_only()
    assert not QuerySettings(sql="WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d").is_read_only()
    assert not QuerySettings(sql="INSERT INTO t VALUES (1)").is_read_only()
    assert not QuerySettings(statements=["SELECT 1"]).is_read_only()
    assert QuerySettings(sql="CALL p()", read_only=True).is_read_only()
