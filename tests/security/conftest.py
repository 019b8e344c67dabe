from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from xcstack.security.audit.log import AuditLog
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import SoftSM2Signer


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def signer() -> SoftSM2Signer:
    return SoftSM2Signer("test-sm2")


@pytest.fixture
async def audit_log(tmp_path: Path, signer: SoftSM2Signer) -> AsyncIterator[AuditLog]:
    log = AuditLog(tmp_path / "audit", AuditSettings(checkpoint_interval_s=3600), chain="t", signer=signer)
    await log.open()
    yield log
    await log.close()


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_database() -> object:
    """A throw-away PostgreSQL database for this test session (skipped when PostgreSQL is down)."""
    import uuid

    try:
        import psycopg

        conn = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    name = f"xc_security_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    from xcstack.state.store import StateStore

    if request.param == "sqlite":
        store = StateStore(None, tmp_path / "state")
        yield store
        await store.close()
        return
    url = request.getfixturevalue("pg_database")
    store = StateStore(str(url), tmp_path)
    for table in ("sec_users", "sec_pw_history", "sec_sessions", "sec_api_keys", "sec_roles", "sec_lockout",
                  "sec_secrets"):
        await store.execute(f"DROP TABLE IF EXISTS {table}")
    await store.execute("DROP TABLE IF EXISTS xc_schema_version")
    yield store
    await store.close()


@pytest.fixture
async def service(state: object, tmp_path: Path, clock: FakeClock, signer: SoftSM2Signer) -> AsyncIterator[object]:
    from xcstack.security.lockout import StateLockout
    from xcstack.security.secretbox import LocalSecretBox
    from xcstack.security.service import SecurityService
    from xcstack.security.settings import SecuritySettings

    settings = SecuritySettings()
    log = AuditLog(tmp_path / "audit", AuditSettings(checkpoint_interval_s=3600), chain="svc", signer=signer)
    await log.open()
    svc = SecurityService(settings, state, LocalSecretBox(b"k" * 16),  # type: ignore[arg-type]
                          StateLockout(state, settings.lockout_threshold, settings.lockout_s, clock),  # type: ignore[arg-type]
                          log, clock)
    await svc.init()
    yield svc
    await log.close()


def audit_records(root: Path) -> list[dict[str, object]]:
    from xcstack.security.audit import record as rec
    from xcstack.security.audit.files import list_chains, list_segments

    out = []
    for chain in list_chains(root):
        for _, p in list_segments(chain):
            out += [rec.loads(x) for x in p.read_bytes().splitlines()]
    return out
