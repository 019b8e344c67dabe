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
