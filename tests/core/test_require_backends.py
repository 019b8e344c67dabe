"""XC_REQUIRE_BACKENDS=1 (set by .ci/run) turns a skip for a backend this machine has into a failure, so
CI cannot go green by skipping what it should test; DM8/GBase and host properties stay skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import is_backend_skip

HERE = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_pg():
    pytest.skip("PostgreSQL not reachable: connection refused")

def test_softhsm():
    pytest.skip("softhsm2 is not installed (scripts/services/crypto.sh installs it)")

def test_dm():
    pytest.skip("XC_TEST_DM_DSN not set (no DM8 server here)")

def test_host():
    pytest.skip("needs two usable cores")
'''


def test_reasons_are_classified() -> None:
    assert is_backend_skip("PostgreSQL at 127.0.0.1:5432 not reachable")
    assert is_backend_skip("MariaDB at 127.0.0.1:3306 is not usable: x")
    assert is_backend_skip("Milvus Lite server did not start")
    assert not is_backend_skip("XC_TEST_GBASE_DSN not set (no GBase 8s here)")
    assert not is_backend_skip("no C compiler for aarch64")


def _run(tmp_path: Path, require: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(HERE.parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "XC_REQUIRE_BACKENDS"}
    if require:
        env["XC_REQUIRE_BACKENDS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_backend_skips_fail_only_when_required(tmp_path: Path) -> None:
    relaxed = _run(tmp_path, require=False)
    assert relaxed.returncode == 0 and "4 skipped" in relaxed.stdout, relaxed.stdout
    strict = _run(tmp_path, require=True)
    assert strict.returncode == 1, strict.stdout
    assert "2 failed, 2 skipped" in strict.stdout and "a required backend was skipped" in strict.stdout
