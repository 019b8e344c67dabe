"""Schema fuzzing: schemathesis against a live `xcstack serve` with every capability and security on.

Every operation of /openapi.json is called with generated valid and invalid input, authenticated:
no answer may be a 5xx, every answer must conform to its documented status, media type and schema
(so every 4xx is in the JSON error model, with a documented code), an undeclared method must get
405, and schema-invalid input must be refused.

Bounded by default (`XC_TEST_FUZZ_SECONDS`, 150 s over three passes); a longer run for manual use:
`XC_TEST_FUZZ_SECONDS=1800 .venv/bin/python -m pytest tests/contract/test_schema_fuzz.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.contract.stack import FullStack

BUDGET_S = float(os.environ.get("XC_TEST_FUZZ_SECONDS", "150"))
# use_after_free / ensure_resource_availability / ignored_auth need stateful links this API does not
# declare; positive_data_acceptance fails on valid input that names a resource that does not exist (404)
EXCLUDED_CHECKS = "use_after_free,ensure_resource_availability,ignored_auth,positive_data_acceptance"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    from tests.inference.conftest import default_model_repo

    st = FullStack(tmp_path_factory.mktemp("fuzz"), default_model_repo(tmp_path_factory), server="granian").start()
    try:
        yield st
    finally:
        st.stop()


def _schemathesis(stack: FullStack, token: str, seconds: float, report: Path, *filters: str) -> tuple[int, str]:
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{stack.base}/openapi.json", "-H", f"Authorization: Bearer {token}",
           "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS, "--max-time", str(int(seconds)),
           "--workers", "1", "--no-color", "--suppress-health-check", "all", "--generation-database", "none",
           "--request-timeout", "30", "--report", "junit", "--report-junit-path", str(report), *filters]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 240,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    return done.returncode, done.stdout + done.stderr


@pytest.mark.timeout(int(BUDGET_S) + 900)  # the budget, schemathesis' start and the shrinking of failures
def test_schema_fuzz_finds_no_server_error_and_no_contract_violation(stack: FullStack, tmp_path: Path) -> None:
    # one pass with an operator role over every operation (the session's own logout would end the run),
    # one with the security administrator over users, roles and keys, one with the auditor over the log
    passes = [
        ("operator", stack.token, 0.6, ("--exclude-path", "/v1/auth/logout", "--exclude-path", "/v1/auth/password")),
        ("secadmin", stack.admin_tokens["secadmin"], 0.25, ("--include-path-regex", "^/v1/security/",)),
        ("auditor", stack.admin_tokens["auditor"], 0.15, ("--include-path-regex", "^/v1/audit/",)),
    ]
    failures = []
    for name, token, share, filters in passes:
        rc, out = _schemathesis(stack, token, max(10.0, BUDGET_S * share), tmp_path / f"{name}.xml", *filters)
        if rc != 0:  # schemathesis exits non-zero on any failed check or error
            failures.append(f"--- pass {name} (exit {rc}) ---\n{out[-12000:]}")
    # Milvus Lite's own gRPC server (a side process) logs a traceback when pymilvus probes AllocTimestamp,
    # which Lite does not implement; pymilvus goes on without it and the answer is right: not ours
    crashed = [line for line in stack.served.output if '"level":"ERROR"' in line and "Traceback" in line
               and not ('"logger":"grpc._server"' in line and "AllocTimestamp" in line)]
    assert failures == [], "\n".join(failures)
    assert crashed == [], "server logged tracebacks during the fuzz:\n" + "".join(crashed[-5:])
