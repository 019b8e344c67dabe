"""`secret:NAME` references in config, resolved when capabilities start: gateway upstream API keys
(sent to a real mock upstream that checks them) and DB DSNs (real PostgreSQL and MariaDB logins);
a reference to a missing secret, or without the security capability, fails start-up naming the
key; the clear value is never in the logs, the audit log, the data directory or `config show`."""

from __future__ import annotations

import contextlib
import io
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from tests.db.conftest import MY_ADMIN, PG_DSN, _my_ready, _pg_ready, item_queries, my_admin_query, pg_admin_query
from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, make_settings, upstream
from xcstack.app import XCStackApp
from xcstack.capability import AppContext
from xcstack.config import ConfigError, Settings, masked_dump
from xcstack.db.settings import DbSettings
from xcstack.security.capability import SecurityCapability
from xcstack.security.secrets import SecretStore, dsn_redactions, redact, resolve_dsn, resolve_setting
from xcstack.security.settings import SecuritySettings
from xcstack.state.store import StateStore

SECURITY_CAP = "xcstack.security.capability"
DB_CAP = "xcstack.db.capability"
UP_KEY = "sk-upstream-from-the-sealed-store-4711"
MSG = [{"role": "user", "content": "hi"}]
ITEM = item_queries(sleep_sql="SELECT 1", kind="my")["item"]


def _secured(settings: Settings) -> Settings:
    settings.security = SecuritySettings.model_validate({"pbkdf2_iterations": 100_000})
    return settings


async def seed(settings: Settings, **values: str) -> None:
    """What `xcstack secret set NAME` does, through the security capability a server would run."""
    ctx = AppContext(settings=settings, state=StateStore(None, settings.data_dir))
    cap = SecurityCapability(ctx, print_bootstrap=lambda s: None)
    await cap.start()
    try:
        for name, value in values.items():
            await cap.secrets.set(name, value.encode())
    finally:
        await cap.stop()
        await ctx.state.close()


@contextlib.asynccontextmanager
async def started(settings: Settings, modules: list[str]) -> AsyncIterator[XCStackApp]:
    """The capabilities' start and stop exactly as an http worker runs them (the app's lifespan)."""
    xc = XCStackApp(settings, modules)
    async with xc.lifespan(Starlette()):
        yield xc


def _bridge(xc: XCStackApp) -> Any:
    from xcstack.db.capability import DbCapability

    return next(c for c in xc.capabilities if isinstance(c, DbCapability)).bridge


def assert_nowhere(value: str, root: Path, *texts: str) -> None:
    for text in texts:
        assert value not in text
    raw = value.encode()
    for f in root.rglob("*"):
        if f.is_file():
            assert raw not in f.read_bytes(), f


# --- gateway ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mock_up() -> Iterator[MockUpstream]:
    m = MockUpstream("sec-ref")
    yield m
    m.stop()


async def test_gateway_sends_the_key_from_the_secret_store(tmp_path: Path, mock_up: MockUpstream,
                                                           caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    mock_up.configure(api_key=UP_KEY)  # anything else gets 401 from the upstream
    settings = _secured(make_settings(tmp_path, [upstream(mock_up, api_key="secret:openai")]))
    await seed(settings, openai=UP_KEY)
    gw = GatewayServer(settings, [SECURITY_CAP, GATEWAY_CAP]).start()
    try:
        status, body = gw.call(lambda: gw.capability.complete(
            "/v1/chat/completions", {"model": "mock-model", "messages": MSG, "max_tokens": 2}))
        assert status == 200, body
        assert mock_up.last()["headers"]["authorization"] == f"Bearer {UP_KEY}"
        assert mock_up.stats()["unauthorized"] == 0
    finally:
        gw.stop()
    # the config keeps the reference; config show, logs, audit log and data dir never hold the value
    assert settings.gateway.upstreams[0].api_key is not None
    assert settings.gateway.upstreams[0].api_key.get_secret_value() == "secret:openai"
    assert "gateway.upstreams[0].api_key: taken from secret 'openai'" in caplog.text
    shown = str(masked_dump(settings))
    assert_nowhere(UP_KEY, settings.data_dir, caplog.text, shown, capsys.readouterr().err)


def test_config_show_keeps_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xcstack.cli import main

    cfg = tmp_path / "xc.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n\n[[gateway.upstreams]]\nname = "a"\n'
                   f'base_url = "http://127.0.0.1:9/v1"\nmodels = ["m"]\napi_key = "secret:openai"\n\n'
                   '[db.databases.main]\ndriver = "postgres"\n'
                   'dsn = "postgresql://app:{secret:db-main}@127.0.0.1/app"\n')
    assert main(["--config", str(cfg), "config", "show"]) == 0
    out = capsys.readouterr().out
    assert '"api_key": "**********"' in out and '"dsn": "**********"' in out


async def test_gateway_missing_secret_fails_start_naming_the_key(tmp_path: Path, mock_up: MockUpstream) -> None:
    settings = _secured(make_settings(tmp_path, [upstream(mock_up), upstream(mock_up, name="b",
                                                                           api_key="secret:nope")]))
    await seed(settings)
    with pytest.raises(ConfigError, match=r"^gateway\.upstreams\[1\]\.api_key: secret 'nope' not found "
                                          r"\(xcstack secret set nope\)$"):
        async with started(settings, [SECURITY_CAP, GATEWAY_CAP]):
            pass


async def test_gateway_reference_without_security_capability_fails_start(tmp_path: Path,
                                                                        mock_up: MockUpstream) -> None:
    settings = make_settings(tmp_path, [upstream(mock_up, api_key="secret:openai")])
    with pytest.raises(ConfigError, match=r"^gateway\.upstreams\[0\]\.api_key: refers to secret 'openai', but "
                                          r"the security capability .* is not enabled"):
        async with started(settings, [GATEWAY_CAP]):
            pass
    # and the service on its own (no capability to resolve it) refuses to send the reference
    from xcstack.gateway.service import GatewayService

    svc = GatewayService(settings.gateway, max_body_bytes=1 << 20)
    assert "Authorization" not in svc.upstreams[0].headers
    with pytest.raises(ConfigError, match="api_key 'secret:openai' was not resolved"):
        await svc.start()
    await svc.stop()


async def test_multi_line_secret_is_refused_as_api_key(tmp_path: Path, mock_up: MockUpstream) -> None:
    settings = _secured(make_settings(tmp_path, [upstream(mock_up, api_key="secret:two-lines")]))
    await seed(settings, **{"two-lines": "sk-a\nX-Injected: 1"})
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.api_key: secret 'two-lines' contains control"):
        async with started(settings, [SECURITY_CAP, GATEWAY_CAP]):
            pass


# --- db ----------------------------------------------------------------------------------------
def _db_settings(tmp_path: Path, databases: dict[str, Any]) -> Settings:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return _secured(Settings(data_dir=data, db=DbSettings.model_validate({"databases": databases})))


@pytest.fixture(scope="module")
def pg() -> str:
    why = _pg_ready()
    if why:
        pytest.skip(why)
    return PG_DSN


@pytest.fixture(scope="module")
def mysql() -> None:
    why = _my_ready()
    if why:
        pytest.skip(why)


@pytest.fixture
def my_user(mysql: None) -> Iterator[tuple[str, str]]:
    """A MariaDB account that only logs in with its password (URL-special characters in it)."""
    user = f"xcsec_{uuid.uuid4().hex[:10]}"
    pw = f"p@ss/w:rd%?#&{uuid.uuid4().hex[:8]}"
    for host in ("127.0.0.1", "localhost"):
        my_admin_query(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY %s", pw)
        my_admin_query(f"GRANT SELECT ON xcdb_test.* TO '{user}'@'{host}'")
    yield user, pw
    for host in ("127.0.0.1", "localhost"):
        my_admin_query(f"DROP USER IF EXISTS '{user}'@'{host}'")


async def test_db_password_placeholder_logs_in_to_mariadb(tmp_path: Path, my_user: tuple[str, str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    user, pw = my_user
    dsn = f"mysql://{user}:{{secret:my-pw}}@127.0.0.1:{MY_ADMIN['port']}/xcdb_test"
    settings = _db_settings(tmp_path, {"main": {"driver": "mysql", "dsn": dsn, "pool_size": 2,
                                                "queries": {"item": ITEM}}})
    await seed(settings, **{"my-pw": pw})
    async with started(settings, [SECURITY_CAP, DB_CAP]) as xc:
        bridge = _bridge(xc)
        assert bridge.ready() == (True, "ok")
        r = await bridge.query("main", "item", {"id": 7})
        assert r.rows[0][:2] == (7, "item 7")
        who = my_admin_query("SELECT USER FROM information_schema.PROCESSLIST WHERE USER = %s", user)
        assert len(who) == 2  # the pool's connections, logged in as the account with its password
    assert settings.db.databases["main"].dsn is not None
    assert settings.db.databases["main"].dsn.get_secret_value() == dsn  # the config keeps the reference
    assert "db.databases.main.dsn: secret references resolved" in caplog.text
    assert_nowhere(pw, settings.data_dir, caplog.text, str(masked_dump(settings)))


def test_db_check_cli_resolves_what_secret_set_stored(tmp_path: Path, my_user: tuple[str, str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The operator's path: `xcstack secret set my-pw --stdin`, then `xcstack db check` logs in."""
    import sys

    from xcstack.cli import main

    user, pw = my_user
    monkeypatch.setenv("XC_CRYPTO__ACCESS", "direct")
    cfg = tmp_path / "xc.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[security]\npbkdf2_iterations = 100000\n'
                   f'[db.databases.main]\ndriver = "mysql"\npool_size = 1\n'
                   f'dsn = "mysql://{user}:{{secret:my-pw}}@127.0.0.1:3306/xcdb_test"\n')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pw.encode() + b"\n")))
    assert main(["--config", str(cfg), "secret", "set", "my-pw", "--stdin"]) == 0
    assert main(["--config", str(cfg), "db", "check", "--json"]) == 0
    out = capsys.readouterr()
    assert '"ok": true' in out.out
    assert_nowhere(pw, tmp_path / "data", out.out, out.err)


async def test_db_whole_dsn_secret_connects_to_postgres(tmp_path: Path, pg: str) -> None:
    role = f"xcsec_{uuid.uuid4().hex[:10]}"
    pg_admin_query(f"CREATE ROLE {role} LOGIN PASSWORD 'unused-here'")
    try:
        settings = _db_settings(tmp_path, {
            "pgmain": {"driver": "postgres", "dsn": "secret:pg-dsn", "pool_size": 1, "queries": {
                "me": {"sql": "SELECT current_user AS u"}}},
            "pgshards": {"driver": "postgres", "shards": ["{secret:pg-dsn}", pg], "pool_size": 1, "queries": {
                "me": {"sql": "SELECT current_user AS u", "fan_out": True}}},
        })
        await seed(settings, **{"pg-dsn": f"host=127.0.0.1 port=5432 user={role} dbname=xcdb_test"})
        async with started(settings, [SECURITY_CAP, DB_CAP]) as xc:
            bridge = _bridge(xc)
            assert (await bridge.query("pgmain", "me", {})).rows == [(role,)]
            assert sorted(r[0] for r in (await bridge.query("pgshards", "me", {})).rows) == sorted([role,
                                                                                                    "postgres"])
    finally:
        pg_admin_query(f"DROP ROLE IF EXISTS {role}")


async def test_db_missing_secret_or_no_security_fails_start_naming_the_key(tmp_path: Path) -> None:
    dbs = {"main": {"driver": "sqlite", "dsn": str(tmp_path / "a.db")},
           "sh": {"driver": "postgres", "shards": ["host=127.0.0.1 dbname=x", "host=127.0.0.1 password={secret:gone}"],
                  "queries": {"q": {"sql": "SELECT 1", "fan_out": True}}}}
    settings = _db_settings(tmp_path, dbs)
    await seed(settings)
    with pytest.raises(ConfigError, match=r"^db\.databases\.sh\.shards\[1\]: secret 'gone' not found "
                                          r"\(xcstack secret set gone\)$"):
        async with started(settings, [SECURITY_CAP, DB_CAP]):
            pass
    with pytest.raises(ConfigError, match=r"^db\.databases\.sh\.shards\[1\]: refers to secret 'gone', but the "
                                          "security capability"):
        async with started(settings, [DB_CAP]):
            pass
    from xcstack.db.bridge import Bridge

    bridge = Bridge(settings.db)  # used on its own, without a secret store
    with pytest.raises(ConfigError, match=r"db\.databases\.sh\.shards\[1\]: refers to secret 'gone'"):
        await bridge.start()
    await bridge.stop()


async def test_db_connect_errors_are_logged_without_the_password(tmp_path: Path, pg: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """psycopg quotes a bad percent-escape from the DSN in its error: the log line is redacted."""
    caplog.set_level(logging.DEBUG)
    secret_dsn = "postgresql://postgres:Zz9%ZZ-very-secret@127.0.0.1:5432/xcdb_test"
    settings = _db_settings(tmp_path, {"main": {"driver": "postgres", "dsn": "secret:bad-dsn", "pool_size": 1,
                                                "reconnect_backoff_initial_s": 5, "reconnect_backoff_max_s": 5}})
    await seed(settings, **{"bad-dsn": secret_dsn})
    async with started(settings, [SECURITY_CAP, DB_CAP]) as xc:
        assert _bridge(xc).ready()[0] is False
    assert "connect failed: ProgrammingError: invalid percent-encoded token" in caplog.text
    assert "Zz9%ZZ-very-secret" not in caplog.text and "very-secret" not in caplog.text


# --- the resolver on its own -------------------------------------------------------------------------
class _Store:
    def __init__(self, **values: str) -> None:
        self.values = values

    async def reveal(self, name: str) -> bytearray:
        from xcstack.errors import NotFound

        if name not in self.values:
            raise NotFound(f"no secret named {name!r}", code="secret_not_found")
        return bytearray(self.values[name].encode())


async def test_resolve_dsn_forms() -> None:
    s: Any = _Store(pw="a b'c;d@e/f", plain="s3cr3t", whole="host=h user=u password='x y'")
    out, red = await resolve_dsn(s, "postgresql://u:{secret:pw}@h/db", "k")
    assert out == "postgresql://u:a%20b%27c%3Bd%40e%2Ff@h/db" and "a b'c;d@e/f" in red
    out, red = await resolve_dsn(s, "host=h user=u password={secret:plain} dbname=d", "k")
    assert out == "host=h user=u password=s3cr3t dbname=d" and red == ["s3cr3t"]
    assert (await resolve_dsn(s, "{secret:whole}", "k"))[0] == "host=h user=u password='x y'"
    assert (await resolve_dsn(s, "secret:whole", "k"))[0] == "host=h user=u password='x y'"
    with pytest.raises(ConfigError, match="k: secret 'pw' holds spaces"):
        await resolve_dsn(s, "host=h password={secret:pw}", "k")
    with pytest.raises(ConfigError, match="k: 'a b' is not a valid secret name"):
        await resolve_dsn(s, "host=h password={secret:a b}", "k")
    assert await resolve_setting(s, "plain-key", "k") == "plain-key"
    assert redact("failed: 'x y' at h", dsn_redactions("host=h password='x y'")) == "failed: *** at h"
    assert redact("bad token: \"p%ZZ\"", dsn_redactions("mysql://u:p%ZZ@h/d")) == "bad token: \"***\""


async def test_secret_store_resolution_of_a_value_sealed_for_another_name(service: Any, state: Any) -> None:
    """A row moved to another name does not open (AAD): a clear start-up error, not garbage."""
    store = SecretStore(state, service.box)
    await store.set("a", b"value-a")
    await state.execute("UPDATE sec_secrets SET name = 'b' WHERE name = 'a'")
    with pytest.raises(ConfigError, match="x: secret 'b' cannot be opened with this node's key"):
        await resolve_setting(store, "secret:b", "x")
    assert await resolve_setting(store, "plain", "x") == "plain"
