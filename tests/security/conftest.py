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


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[object]:
    from xcstack.state.store import StateStore

    store = StateStore(None, tmp_path / "state")
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
    from xcstack.security.audit.log import list_chains, list_segments

    out = []
    for chain in list_chains(root):
        for _, p in list_segments(chain):
            out += [rec.loads(x) for x in p.read_bytes().splitlines()]
    return out
